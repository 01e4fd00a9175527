"""Scale-out on CPU: perf.slo_proof's SLO workload through HAProxy in front of 1 and then 2 `triffusion serve`
replicas, each pinned to its own core, swept up in rate to the max load at 99% attainment; then a replica
killed mid-run; and the simulator's prediction of every point (made before it ran) and of a 1-64 GPU
cluster, with and without the cascade split.

1. The repository: `--repo` (one perf.slo_proof prepared: the registry's tiny family, its step-quality and
   cascade profiles), else prepared here the same way; served with slo_proof's full configuration.
2. Replicas: `taskset -c i python -m triffusion.cli serve ...` for replica i (i = 0, 1: one core each; the
   tritonserver and every python stub inherit the affinity). HAProxy (triffusion.balancer: leastconn,
   /v2/health/ready checks) and this load generator are not pinned: they share both cores.
3. Per replica count: a calibration point on the first replica (what the simulator learns the server's
   speed from; with more replicas, the same point spread over them, so that every replica has served and
   learned its speed before it is measured), then slo_proof.sweep through the balancer's gRPC port: Poisson rates up by --step until
   attainment (met / sent) fell below 99% twice; the max load at 99% is the last rate that met it before the
   first miss. A coarse sweep first (short points, x2 apart) brackets the 1-replica limit and the fine one starts
   at its last passing rate; the 2-replica sweep starts at the 1-replica limit, so both lie on one grid. Every point is
   predicted by slo_proof.Predictor spread over that many servers (least loaded first) before it runs.
4. Replica kill (2 replicas, at --kill-load x the 2-replica limit): replica r1 is SIGKILLed (launcher,
   tritonserver and stubs) --kill-at seconds in, and started again at once, as a service manager would.
   Each request ends as met/late/rejected/error/lost; lost (no answer within --timeout-s) are the hung
   ones. failed = ended without an image for a reason other than admission (the kill); the ones sent before
   the kill are compared with the requests r1 held (HAProxy's count just before it). readmitted_s: from the
   restarted replica's readiness to the balancer sending it work again (its check passing `rise` times).
5. Simulator: the 1- and 2-replica predictions against the measured points (relative error per point),
   and a cluster of 1-64 GPUs at the measured per-replica limit: attainment and goodput with cascades
   redone in place and with the controller's light/heavy GPU split.

    python -m perf.scale_out --repo /tmp/proofwork/repo --out perf/results/cpu-tiny/scale_out.json
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from perf import slo_proof
from perf.cli import OneLineParser, device_name, write_json
from perf.overload import run_load
from perf.workloads import poisson_arrivals
from triffusion import contract
from triffusion.balancer import Balancer, Replica
from triffusion.server import free_port

ADMISSION = ("queue_full", "slo_infeasible", "would_break_admitted_slo")
log = slo_proof.log


class Cluster:
    """The first n replicas behind their own HAProxy, answering what slo_proof.sweep asks of a served system."""

    system = "full"
    model = contract.TEXT_TO_IMAGE

    def __init__(self, replicas: list[Replica], key: str, workdir: Path):
        self.replicas, self.key = replicas, key
        self.balancer = Balancer([r.backend for r in replicas], free_port(), free_port(),
                                 workdir=workdir / f"balancer{len(replicas)}")

    def __enter__(self):
        self.balancer.start()
        try:
            for replica in self.replicas:
                self.balancer.wait_status(replica.name, "UP", 10)
        except BaseException:
            self.balancer.stop()
            raise
        self.url = self.balancer.urls["grpc"]
        return self

    def __exit__(self, *exc):
        self.balancer.stop()

    def control(self, op: str, replica: int = 0) -> dict:
        from triffusion.supervisor import AdminClient

        r = self.replicas[replica]
        return AdminClient(f"127.0.0.1:{r.http_port}", f"localhost:{r.grpc_port}", self.key).control({"op": op})

    def gauges(self, family: str) -> dict:
        """Per replica, the family's gauges from its /metrics (the controller's decisions)."""
        import urllib.request

        out = {}
        for r in self.replicas:
            text = urllib.request.urlopen(f"http://localhost:{r.metrics_port}/metrics", timeout=5).read().decode()
            out[r.name] = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                           for line in text.splitlines() if line.startswith(family + "{")}
        return out


def lean(row: dict) -> dict:
    """A sweep point without its per-request records (the counts stay)."""
    return {k: v for k, v in row.items() if k != "raw"}


def errors(rows: list[dict]) -> list[dict]:
    """Per measured point: the prediction made before it ran and its relative error, per metric."""
    out = []
    for row in rows:
        predicted = row.get("predicted")
        if not predicted:
            continue
        entry = {"rate": row["rate"]}
        for metric in ("attainment", "goodput_rps"):
            m, p = row[metric], predicted[metric]
            entry[metric] = {"measured": m, "predicted": p,
                             "rel_error": round(abs(p - m) / m, 4) if m else (0.0 if p == m else None)}
        out.append(entry)
    return out


def replica_kill(cluster: Cluster, rate: float, classes: dict, args) -> dict:
    """A Poisson run through the balancer; replica r1 is killed --kill-at s in and started again at once."""
    arrivals = poisson_arrivals(rate, args.kill_duration_s, args.seed + 900)
    requests = slo_proof.sample(len(arrivals), args.seed + 900, classes)
    victim = cluster.replicas[1]
    holder: dict = {}

    def load():
        holder["started"] = time.monotonic()
        holder["result"] = asyncio.run(run_load(cluster.url, requests, arrivals, model=cluster.model,
                                                timeout_s=args.timeout_s))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(args.kill_at_s)  # the kill is due at a time of the run, not on an event
    stats = cluster.balancer.servers()[victim.name]
    held, placed_before = stats["scur"], stats["stot"]
    killed = time.monotonic()
    victim.kill()
    cluster.balancer.wait_status(victim.name, "DOWN", 30)
    down_s = time.monotonic() - killed
    # Requests HAProxy put on the victim after the SIGKILL and before it marked it down: its connections stay
    # open until the kernel has torn the process down, and a stream sent on one then fails.
    placed_while_dying = cluster.balancer.servers()[victim.name]["stot"] - placed_before
    victim.start()
    victim.wait_ready(600)
    ready = time.monotonic()
    readmitted_s = cluster.balancer.wait_status(victim.name, "UP", 30)
    up = time.monotonic()
    thread.join(args.kill_duration_s + args.timeout_s + 60)
    if thread.is_alive():
        raise RuntimeError("the replica-kill run did not end")
    result = holder["result"]
    kill_at = killed - holder["started"]  # on the run's clock, give or take the loop's start
    counts = slo_proof.outcome_counts(result)
    failed = [r for r in result.records if r.outcome in ("error", "rejected") and r.reason not in ADMISSION
              and not (r.message or "").startswith("timeout")]
    before = [r for r in failed if r.sent_s is not None and r.sent_s < kill_at]
    fail_ms = sorted((r.finished_s - max(r.sent_s, kill_at)) * 1000 for r in before)
    after_ms = sorted(round((r.sent_s - kill_at) * 1000, 1) for r in failed if r.sent_s is not None and r.sent_s >= kill_at)
    sent = len(result.records)
    return {
        "rate": rate, "duration_s": args.kill_duration_s, "sent": sent, **counts,
        "attainment": round(counts["met"] / sent, 4) if sent else None,
        "hung": counts["lost"], "failed": len(failed), "failed_sent_before_kill": len(before),
        "failed_sent_after_kill": len(failed) - len(before), "in_flight_on_killed": held,
        "failed_sent_after_kill_ms_after": after_ms, "placed_on_killed_while_dying": placed_while_dying,
        "failure_reasons": sorted({r.reason for r in failed}),
        "failed_within_ms_of_kill_max": round(fail_ms[-1], 1) if fail_ms else None,
        "kill_at_s": round(kill_at, 2), "marked_down_after_s": round(down_s, 2),
        "restart_to_ready_s": round(ready - killed, 1), "readmitted_s": round(readmitted_s, 2),
        "kill_to_readmitted_s": round(up - killed, 1),
        "placed_after": cluster.balancer.servers(),
    }


def cluster_prediction(pipeline: dict, exported: dict, learned: dict, classes: dict, per_gpu_rate: float,
                       gpu_counts: list[int], args) -> dict:
    """Attainment and goodput of 1..64 GPUs at `per_gpu_rate` each, arrivals spread least-loaded-first, the
    simulator fed the same profiles as the validated predictions:
    - `controller`: as served, the cascade's controller choosing among the measured operating points (and
      the light/heavy GPU split it would choose for that many GPUs, when it puts any GPU apart);
    - `escalation`: a cascade escalating --sim-escalation of the light answers (the tiny preset's random gate
      escalates all or nothing), redone in place on every GPU vs on heavy GPUs split off as DiffServe does
      (the fewest that carry the escalated load at 80%, cascade.feasible_split)."""
    from triffusion.orchestrator.cascade import Option, choose, feasible_split, options_from

    cascade = pipeline.get("cascade") or {}
    options = options_from(cascade.get("options") or [])
    served = slo_proof.Predictor(pipeline, exported, learned, classes)
    fixed_pipeline = copy.deepcopy(pipeline)
    fixed_pipeline.setdefault("cascade", {})["options"] = []  # no controller: the escalation is fixed
    fixed = slo_proof.Predictor(fixed_pipeline, exported, learned, classes)
    fixed._escalation = lambda: args.sim_escalation
    steps = max(o.steps for o in options) if options else 20
    point = next((o for o in options if o.steps == steps), None)
    light_s, heavy_s = (point.light_s, point.heavy_s) if point else (0.03, 0.04)
    option = Option(threshold=0.5, steps=steps, escalation=args.sim_escalation, quality=0.0, light_s=light_s,
                    heavy_s=heavy_s)
    sim_args = copy.copy(args)
    sim_args.min_window_s, sim_args.min_requests = args.sim_window_s, 0

    def run(model, gpus, heavy, rate):
        model.gpus, model.heavy_gpus = gpus, heavy
        return model(rate, args.seed + 1200 + gpus, sim_args)

    out = {}
    for gpus in gpu_counts:
        rate = per_gpu_rate * gpus
        started = time.perf_counter()
        row = {"rate": round(rate, 3), "controller": {"in_place": run(served, gpus, 0, rate)}}
        decision = choose(options, rate, gpus) if options and gpus >= 2 else None
        heavy = decision.heavy_gpus if decision is not None else 0
        row["controller"]["split"] = ({**run(served, gpus, heavy, rate), "heavy_gpus": heavy} if 0 < heavy < gpus
                                      else {"same_as_in_place": f"the controller puts {heavy} GPUs apart for the heavy model"})
        split = feasible_split(option, rate, gpus, 0.8) if gpus >= 2 else None
        row["escalation"] = {"rate": args.sim_escalation, "in_place": run(fixed, gpus, 0, rate)}
        row["escalation"]["split"] = ({**run(fixed, gpus, split[1], rate), "light_gpus": split[0], "heavy_gpus": split[1]}
                                      if split and 0 < split[1] < gpus else
                                      {"skipped": "one GPU" if gpus < 2 else "no split carries this load at 80%"})
        row["sim_wall_s"] = round(time.perf_counter() - started, 2)
        out[str(gpus)] = row
        log(f"cluster {gpus} GPUs at {rate:.2f}/s: {json.dumps({k: v for k, v in row.items() if k != 'rate'})}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.scale_out", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", help="a repository perf.slo_proof prepared (skips export and profiling)")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--cores", default="0,1", help="replica i runs on core cores[i] (taskset -c)")
    ap.add_argument("--start-rate", type=float, default=1.0, help="first rate of the 1-replica sweep")
    ap.add_argument("--step", type=float, default=1.15)
    ap.add_argument("--max-rate", type=float, default=60.0)
    ap.add_argument("--min-requests", type=int, default=40)
    ap.add_argument("--min-window-s", type=float, default=10.0)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--coarse-step", type=float, default=2.0, help="first sweep: rate multiplier (0: none)")
    ap.add_argument("--coarse-requests", type=int, default=15, help="first sweep: requests per point at least")
    ap.add_argument("--kill-load", type=float, default=0.4, help="kill run: this fraction of the 2-replica limit")
    ap.add_argument("--kill-duration-s", type=float, default=45.0)
    ap.add_argument("--kill-at-s", type=float, default=12.0)
    ap.add_argument("--sim-gpus", default="1,2,4,8,16,32,64")
    ap.add_argument("--sim-window-s", type=float, default=20.0)
    ap.add_argument("--sim-escalation", type=float, default=0.3, help="cluster prediction: escalated light answers")
    ap.add_argument("--profile-n", type=int, default=6)
    ap.add_argument("--gate-n", type=int, default=48, help="without --repo: as perf.slo_proof's")
    ap.add_argument("--cascade-n", type=int, default=24, help="without --repo: as perf.slo_proof's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # servers and the balancer are stopped on the way out
    counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    cores = [c for c in args.cores.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        ap.error(f"--replicas: {args.replicas!r} is not a list of replica counts >= 1")
    workdir = Path(tempfile.mkdtemp(prefix="scale_out-"))
    started = time.time()
    source = Path(args.repo) if args.repo else slo_proof.prepare(workdir, args)
    # 1. The served repository: slo_proof's full configuration.
    from triffusion.export.repository import write_repository

    repo = workdir / "repo-full"
    shutil.copytree(source, repo, symlinks=True)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator=dict(slo_proof.FULL))
    classes = pipeline["limits"]["slo_classes"]
    exported = json.loads((repo / contract.ORCHESTRATOR / "1" / "profile.json").read_text())
    report = {"bench": "scale_out", "device": device_name("cpu"), "date": time.strftime("%Y-%m-%d"),
              "commit": slo_proof.commit(),
              "command": "python -m perf.scale_out " + " ".join(argv if argv is not None else sys.argv[1:]),
              "pinning": "replica i: `taskset -c cores[i] python -m triffusion.cli serve ...` (tritonserver and its "
                         "stubs inherit the affinity); haproxy and the load generator unpinned",
              "balancer": "haproxy (Debian), balance leastconn, option httpchk GET /v2/health/ready every 500 ms, "
                          "timeout check 2 s, fall 3 rise 2",
              "target": slo_proof.TARGET, "step": args.step, "min_requests": args.min_requests,
              "min_window_s": args.min_window_s, "mix": slo_proof.MIX, "full_config": slo_proof.FULL,
              "sweeps": {}, "max_load_at_99": {}, "simulator": {"validation": {}}}
    # 2. Every replica starts once, pinned; an n-replica phase puts the first n behind a balancer of its own
    # (an idle replica waits on a condition variable: it takes no CPU from the others).
    key = secrets.token_hex(16)
    replicas = [Replica(f"r{i}", repo, free_port(), free_port(), free_port(), cores=cores[i % len(cores)],
                        log_path=workdir / f"r{i}.log", env={"TRIFFUSION_ADMIN_KEY": key})
                for i in range(max(counts))]
    model = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready(600)
        for n in counts:
            log(f"{n} replica(s)")
            with Cluster(replicas[:n], key, workdir) as cluster:
                if model is None:  # calibration on one replica, as slo_proof does, then the simulator from it
                    calib = slo_proof.point(cluster, 1.5 * args.start_rate, args.seed + 1000, classes, args)
                    learned = cluster.control("profile")
                    learned.pop("code", None)
                    # The simulator's profile knows encode and decode; the server also learns other stages (the gate).
                    learned["stages"] = [row for row in learned.get("stages", []) if row[0] in ("encode", "decode")]
                    report["calibration"] = {k: calib[k] for k in ("rate", "attainment", "goodput_rps", "sent")}
                    report["learned_profile"] = learned
                    model = slo_proof.Predictor(pipeline, exported, learned, classes)
                else:  # the replicas added since were never loaded: the same warm-up point, spread over them
                    warm = slo_proof.point(cluster, 1.5 * args.start_rate * n, args.seed + 1000 + n, classes, args)
                    report.setdefault("warmups", {})[str(n)] = {k: warm[k] for k in ("rate", "attainment", "goodput_rps",
                                                                                    "sent")}
                model.gpus = n
                sweep_args = copy.copy(args)
                # The next sweep starts at the previous count's limit (which it should meet), so both sweeps lie on
                # one grid and the ratio of their limits is a power of --step.
                previous = [report["max_load_at_99"].get(str(c)) for c in counts if c < n]
                sweep_args.start_rate = previous[-1] if previous and previous[-1] else args.start_rate * n
                if not (previous and previous[-1]) and args.coarse_step:
                    # Where the limit lies is not known yet: a coarse sweep (short points, --coarse-step apart)
                    # brackets it, and the fine sweep starts at its last rate that met the target.
                    coarse = copy.copy(sweep_args)
                    coarse.step, coarse.min_requests, coarse.seed = args.coarse_step, args.coarse_requests, args.seed + 500
                    coarse_rows, coarse_limit = slo_proof.sweep(cluster, classes, coarse)
                    report.setdefault("coarse_sweeps", {})[str(n)] = [lean(r) for r in coarse_rows]
                    sweep_args.start_rate = coarse_limit or sweep_args.start_rate
                rows, limit = slo_proof.sweep(cluster, classes, sweep_args, lambda rate, seed: model(rate, seed, args))
                report["sweeps"][str(n)] = [lean(r) for r in rows]
                report["max_load_at_99"][str(n)] = limit
                report["simulator"]["validation"][str(n)] = errors(rows)
                write_json(args.out, {**report, "partial": True})  # what is measured survives an interruption
                if n == max(counts) and n >= 2:
                    rate = round(args.kill_load * (limit or args.start_rate * n), 3)
                    log(f"replica kill at {rate}/s")
                    report["replica_kill"] = replica_kill(cluster, rate, classes, args)
                    write_json(args.out, {**report, "partial": True})
                    log(f"replica kill: {report['replica_kill']}")
    finally:
        for replica in replicas:
            replica.stop()
    limits = report["max_load_at_99"]
    one, two = limits.get("1"), limits.get("2")
    report["ratio_2_over_1"] = round(two / one, 2) if one and two else None
    report["acceptance"] = {"target_ratio": 1.7, "met": bool(report["ratio_2_over_1"] and report["ratio_2_over_1"] >= 1.7)}
    validation = [e[m]["rel_error"] for rows in report["simulator"]["validation"].values() for e in rows
                  for m in ("attainment", "goodput_rps") if e[m]["rel_error"] is not None]
    report["simulator"]["max_rel_error"] = round(max(validation), 4) if validation else None
    # 5. The cluster, 1-64 GPUs, at the measured per-replica limit (after the measurements: it takes CPU).
    per_gpu = one or args.start_rate
    log(f"cluster prediction at {per_gpu}/s per GPU")
    report["simulator"]["cluster"] = {"per_gpu_rate": per_gpu, "window_s": args.sim_window_s,
                                      "gpus": cluster_prediction(pipeline, exported, report["learned_profile"], classes,
                                                                 per_gpu, [int(g) for g in args.sim_gpus.split(",")],
                                                                 args)}
    report["elapsed_s"] = round(time.time() - started, 1)
    print(json.dumps({k: report.get(k) for k in ("max_load_at_99", "ratio_2_over_1", "replica_kill")}, indent=1))
    return 0 if write_json(args.out, report) else 2


if __name__ == "__main__":
    raise SystemExit(main())
