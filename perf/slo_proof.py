"""The SLO proof on CPU: the full system, the full system with each feature switched off in turn, and both
baselines, under a mixed workload with real SLO classes, every sent request counted once.

What runs (one command, one JSON; the tiny preset on this machine):
1. Export the registry's tiny family (heavy and light UNets, cascade, SLO classes) with the baselines,
   then measure what the served configuration needs, with the documented commands: the step-quality
   curves and entropy-stop profile (`perf.profile_steps --write`), the cascade's gate trained on the
   repository's own answers (`perf.train_gate --write`: heavy = real, light = generated; the seeded random
   gate scores every answer alike) and the cascade's operating points with thresholds by escalation
   fraction (`perf.profile_cascade --escalate ... --write`, which the controller then chooses among).
2. Systems, each served on its own (a fresh server per system, same repository, same requests):
   full (admission with degradation, EDF with priorities, step_mode auto with a live entropy stop and
   the classes' quality floors, cascades with the controller, hybrid=auto); no_admission; no_auto_steps;
   no_cascade; no_hybrid; no_edf (FCFS); baseline_batching; baseline_sequential. Requests go through the
   unary gRPC path of each (the `text_to_image` front, or the baseline model), from one client.
3. Workload: the `MIX` below (interactive 64^2, standard 128^2, batch 128^2; the baselines get the same
   requests without the fields they cannot serve: `unet=cascade`, `step_mode=auto`), seeded Poisson
   arrivals swept upward per system until attainment fell below 99% twice in a row (a measured
   crossing); then, per system, a Gamma (CV 4) and a MAF-shaped trace at 70% of its own limit.
4. Every sent request ends as exactly one of met (answered within its SLO, client-measured), late,
   rejected (UNAVAILABLE), error, lost (no answer within --timeout-s). Attainment = met / sent; goodput =
   met / trace window (never above the offered load, sent / window).
5. Full system only: 5x-capacity bursts (admitted requests' attainment, time to a rejection), Poisson at
   2x and 3x its limit (goodput against its peak, admitted attainment), the controller's decisions read
   from /metrics every 0.5 s while each point runs (`controller_during`), and the simulator's prediction of every sweep point made before it ran,
   from profiles measured beforehand (export profile, step-quality and entropy-stop profiles, and the
   latency model learned in a calibration run at --calibration-rate with another seed), its simulated
   load controller starting where the server's stands before the point (`predicted.controller_start`).
6. perf_analyzer (which stops at the first error, so it cannot count a system that rejects) replays
   one sub-capacity point of each system with --request-intervals as a cross-check of the latencies.

    python -m perf.slo_proof --out perf/results/cpu-tiny/slo_proof.json
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from perf.cli import OneLineParser, device_name, write_json
from perf.overload import run_load
from perf.workloads import gamma_arrivals, load_prompts, maf_arrivals, poisson_arrivals
from triffusion import contract

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "registry.example.yaml"
TARGET = 0.99
# The served configuration of the full system. On this CPU: every ONNX Runtime session on one thread (the server
# runs several models at once on two cores: two processes with a two-thread pool each ran a UNet step 57 times
# a second each, 114 with one thread each; triffusion.runtime), and admission headroom 0.1 (full-system runs
# with the thread fix, 2026-12-02: at 0.2 it refused a request at 10.8/s and then met 100% at 15.1/s, and no
# admitted request ran late in bursts or at 2x and 3x overload; at 0.1 it met 99% up to 21.1/s, still with
# no admitted request late anywhere).
FULL = {"policy": "edf", "hybrid": "auto", "max_active": 8, "max_queue": 64, "max_batch": 16,
        "controller_interval_s": 2.0, "threads": 1, "admission_headroom": 0.1}
SYSTEMS = {
    "full": {},
    "no_admission": {"admission": "off"},
    "no_auto_steps": {"auto_steps": "off"},
    "no_cascade": {"cascade_routing": "off"},
    "no_hybrid": {"hybrid": "bucket"},
    "no_edf": {"policy": "fcfs"},
    "baseline_batching": None,
    "baseline_sequential": None,
}
# weight, request fields (slo_ms is the class's; the client measures against it)
MIX = [
    (0.50, {"slo_class": "interactive", "height": 64, "width": 64, "steps": 20, "step_mode": "auto",
            "unet": "cascade"}),
    (0.35, {"slo_class": "standard", "height": 128, "width": 128, "steps": 20, "step_mode": "auto",
            "unet": "cascade"}),
    (0.15, {"slo_class": "batch", "height": 128, "width": 128, "steps": 30, "step_mode": "auto",
            "unet": "cascade"}),
]
BASELINE_DROPS = ("unet", "step_mode")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- workload ---------------------------------------------------------------------------------
def sample(n: int, seed: int, classes: dict) -> list[dict]:
    rng = random.Random(seed)
    prompts = load_prompts()
    weights = [w for w, _ in MIX]
    out = []
    for i in range(n):
        fields = dict(rng.choices([f for _, f in MIX], weights)[0])
        fields["slo_ms"] = classes[fields["slo_class"]]["slo_ms"]
        fields.update(prompt=prompts[rng.randrange(len(prompts))], seed=rng.randrange(2**31))
        out.append(fields)
    return out


def for_system(requests: list[dict], system: str) -> list[dict]:
    if SYSTEMS[system] is not None:
        return requests
    return [{k: v for k, v in r.items() if k not in BASELINE_DROPS} for r in requests]


def outcome_counts(result) -> dict:
    """met / late / rejected / error / lost, each request counted once."""
    counts = {"met": 0, "late": 0, "rejected": 0, "error": 0, "lost": 0}
    for r in result.records:
        if r.outcome == "ok":
            counts["met"] += 1
        elif r.outcome == "error" and (r.message or "").startswith("timeout"):
            counts["lost"] += 1
        else:
            counts[r.outcome] += 1
    return counts


def measure(url: str, model: str, requests: list[dict], arrivals: list[float], window_s: float,
            timeout_s: float) -> dict:
    result = asyncio.run(run_load(url, requests, arrivals, model=model, timeout_s=timeout_s))
    counts = outcome_counts(result)
    sent = len(result.records)
    assert sum(counts.values()) == sent, counts
    admitted = counts["met"] + counts["late"]
    latencies = sorted(r.latency_ms for r in result.records if r.outcome in ("ok", "late"))
    rejections = sorted(r.latency_ms for r in result.records if r.outcome == "rejected" and r.latency_ms is not None)
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None
    steps = [r.steps_done for r in result.records if r.outcome in ("ok", "late") and r.steps_done is not None]
    return {
        "sent": sent, **counts,
        "attainment": round(counts["met"] / sent, 4) if sent else None,
        "admitted_attainment": round(counts["met"] / admitted, 4) if admitted else None,
        "offered_rps": round(sent / window_s, 3), "goodput_rps": round(counts["met"] / window_s, 3),
        "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
        "reject_p50_ms": pct(rejections, 0.5), "reject_p99_ms": pct(rejections, 0.99),
        "mean_steps_done": round(statistics.fmean(steps), 2) if steps else None,
        "rejected_reasons": dict(result.summary()["rejected_reasons"]),
        "error_reasons": dict(result.summary()["error_reasons"]),
        "raw": [{"arrival_s": round(r.arrival_s, 4), "latency_ms": None if r.latency_ms is None else round(r.latency_ms, 1),
                 "outcome": r.outcome, "slo_ms": r.slo_ms, "steps_done": r.steps_done, "unet": r.unet,
                 "server_slo_met": r.slo_met, "reason": r.reason,
                 "server_ms": (r.timings_ms or {}).get("total"), "predicted_ms": (r.timings_ms or {}).get("predicted"),
                 "server_timings_ms": r.timings_ms}
                for r in result.records],
    }


# ---- servers ------------------------------------------------------------------------------------
class Served:
    """One server for one system: the shared repository's copy with the system's orchestrator config."""

    def __init__(self, repo: Path, system: str, workdir: Path):
        from triffusion.export.repository import write_repository
        from triffusion.server import TritonServer, free_port

        self.system = system
        self.model = contract.TEXT_TO_IMAGE if SYSTEMS[system] is not None else system
        target = workdir / f"repo-{system}"
        if not target.exists():
            shutil.copytree(repo, target, symlinks=True)
        pipeline = json.loads((target / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
        if SYSTEMS[system] is not None:
            write_repository(target, pipeline, orchestrator={**FULL, **SYSTEMS[system]})
        self.server = TritonServer(target, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                   log_file=workdir / f"server-{system}.log")

    def __enter__(self):
        self.server.start()
        self.server.wait_ready(600)
        self.url, self.metrics = self.server.urls["grpc"], self.server.urls["metrics"]
        return self

    def __exit__(self, *exc):
        self.server.stop(grace_s=0)

    def control(self, op: str) -> dict:
        from triffusion.supervisor import AdminClient

        return AdminClient(self.server.internal_http, self.url, self.server.admin_key).control({"op": op})

    def gauges(self, family: str) -> dict:
        text = urllib.request.urlopen(self.metrics, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(family + "{"):
                label = line.split('"')[1]
                out[label] = float(line.rsplit(" ", 1)[1])
        return out


class ControllerWatch:
    """The cascade controller's decisions while a point runs: /metrics (`triffusion_controller`) read every
    `every_s` on a thread of its own. A decision is (threshold, steps); the demand it saw goes with it."""

    def __init__(self, served: Served, every_s: float = 0.5):
        import threading

        self.served, self.every_s, self.samples = served, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controller-watch", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.every_s):
            try:
                gauges = self.served.gauges("triffusion_controller")
            except OSError:
                continue  # a slow /metrics answer is a missed sample, not a failed point
            if "threshold" in gauges:
                self.samples.append((round(time.monotonic() - started, 2), gauges))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Each decision in the order first seen: when, the demand that led to it, the escalation it expects."""
        decisions: dict = {}
        for at, g in self.samples:
            key = (round(g["threshold"], 6), int(g.get("steps", 0)))
            entry = decisions.setdefault(key, {"threshold": key[0], "steps": key[1], "first_s": at, "samples": 0,
                                               "expected_escalation": g.get("expected_escalation"),
                                               "demand_rps_max": 0.0})
            entry["samples"] += 1
            entry["demand_rps_max"] = round(max(entry["demand_rps_max"], g.get("demand_rps", 0.0)), 3)
        return {"samples": len(self.samples), "decisions": list(decisions.values())}


def point(served: Served, rate: float, seed: int, classes: dict, args, arrivals=None, window=None) -> dict:
    if arrivals is None:
        window = max(args.min_window_s, args.min_requests / rate)
        arrivals = poisson_arrivals(rate, window, seed)
    requests = for_system(sample(len(arrivals), seed, classes), served.system)
    if served.system == "full":  # what the controller decided during the point, read from /metrics
        with ControllerWatch(served) as watch:
            row = measure(served.url, served.model, requests, arrivals, window, args.timeout_s)
        row["controller_during"] = watch.summary()
    else:
        row = measure(served.url, served.model, requests, arrivals, window, args.timeout_s)
    row.update(rate=rate, window_s=round(window, 2), seed=seed)
    return row


def sweep(served: Served, classes: dict, args, predict=None) -> tuple[list[dict], float | None]:
    """Poisson rates up by --step until attainment fell below TARGET twice in a row (down first, when the
    first rate already missed it: see crossing)."""
    start = args.start_rate if SYSTEMS[served.system] is not None else args.baseline_start_rate

    def run(rate: float, index: int) -> dict:
        seed = args.seed + index
        prediction = predict(rate, seed) if predict else None  # made before the point runs
        row = point(served, rate, seed, classes, args)
        if prediction is not None:
            row["predicted"] = prediction
        if served.system == "full":
            row["controller"] = served.gauges("triffusion_controller")
        log(f"{served.system} {rate:.2f}/s: attainment {row['attainment']} goodput {row['goodput_rps']} "
            f"(met {row['met']} late {row['late']} rejected {row['rejected']} error {row['error']} lost {row['lost']})")
        return row

    return crossing(run, start, args.step, args.max_rate)


def crossing(run, start: float, step: float, max_rate: float, down_steps: int = 8) -> tuple[list[dict], float | None]:
    """The rates a sweep runs and the limit it finds: up by `step` from `start` until two points missed TARGET;
    the limit is the last rate that met it before the first miss. When the first point already misses (a
    start above the limit, e.g. the previous replica count's), down by `step` until one meets it (at most
    `down_steps`): that rate is the limit, and the point above it the measured miss. `run(rate, index)` runs
    one point and returns its row (with `attainment`)."""
    rows, rate, misses, limit = [], start, 0, None

    def met(row) -> bool:
        return row["attainment"] is not None and row["attainment"] >= TARGET

    while rate <= max_rate and misses < 2:
        row = run(rate, len(rows))
        rows.append(row)
        if met(row):
            if misses == 0:
                limit = rate
        else:
            misses += 1
            if len(rows) == 1:  # above the limit from the start: find the crossing below
                for _ in range(down_steps):
                    rate = round(rate / step, 3)
                    row = run(rate, len(rows))
                    rows.append(row)
                    if met(row):
                        return rows, rate
                return rows, None
        rate = round(rate * step, 3)
    return rows, limit


def sweep_rates(start: float, step: float, max_rate: float, down_steps: int = 8) -> list[float]:
    """Every rate a sweep from `start` may run (crossing's rounding), down and up."""
    rates, rate = [start], start
    for _ in range(down_steps):
        rate = round(rate / step, 3)
        rates.append(rate)
    rate = start
    while rate <= max_rate:
        rate = round(rate * step, 3)
        rates.append(rate)
    return rates


# ---- simulator ------------------------------------------------------------------------------------
class Predictor:
    """The simulator, fed profiles measured before the runs it predicts and the trace of each point."""

    gpus = 1  # servers the trace is spread over, least loaded first (perf.scale_out: replicas behind a balancer)
    heavy_gpus = 0  # of them, serving only the cascade's heavy model (DiffServe's split); 0: cascades in place

    def __init__(self, pipeline: dict, exported: dict, learned: dict, classes: dict):
        from perf.simulator import LatencyModel, scheduler_factory, served_profile
        from triffusion.orchestrator.cascade import LoadController, options_from

        # The export's profile, overridden by what the server learned in the calibration run (the iteration
        # overhead it measured folded into the UNet times, the side stages' measured overlap kept), and the
        # entries it never timed scaled by what serving cost over timing alone on the ones it did
        # (served_profile). The scheduler's learned state (forecast bias per class, stop fractions) seeds the
        # simulated one, which learns on from there as the server's does. No parameter is fit to a load point.
        profile, self.served_scales = served_profile(exported, learned)
        self.latency = LatencyModel(profile)
        cascade = pipeline.get("cascade") or {}
        options = cascade.get("options") or []
        entropy = (pipeline.get("registry") or {}).get("entropy") or {}
        self.controller_state: dict | None = None  # where the server's controller stands as the point starts

        def controller() -> LoadController:
            made = LoadController(options_from(options), gpus=1, interval_s=FULL["controller_interval_s"])
            if self.controller_state:  # the simulated run starts at 0 on its clock
                made.restore(self.controller_state, now=0.0)
            return made
        self.make = scheduler_factory(profile, FULL["policy"], FULL["max_active"], FULL["max_queue"], FULL["max_batch"],
                                      threshold=cascade.get("threshold", 0.5), controller=controller if options else None,
                                      entropy=entropy,
                                      hybrid=FULL["hybrid"], step_quality=pipeline.get("step_quality"),
                                      admission_headroom=FULL["admission_headroom"])
        self.cascade, self.options = cascade, options
        self.auto_stop, self.classes = pipeline.get("auto_stop") or {}, classes

    def __call__(self, rate: float, seed: int, args, controller: dict | None = None) -> dict:
        """Attainment and goodput of the point. `controller`: where the server's load controller stands before
        the point runs (its profile's `controller`, read then); the simulated one goes on from there, as the
        server's does (it carries its demand estimate from one point to the next). None: a fresh one."""
        from perf.simulator import CascadeSpec, SimRequest, simulate

        window = max(args.min_window_s, args.min_requests / rate)
        arrivals = poisson_arrivals(rate, window, seed)
        requests = sample(len(arrivals), seed, self.classes)
        light = self.cascade.get("light", contract.UNET)
        sims = []
        for t, r in zip(arrivals, requests):
            level = self.classes[r["slo_class"]]
            stop = (self.auto_stop.get(light) or {}).get(r["slo_class"])
            steps_run = max(1, round(stop["fraction"] * r["steps"])) if stop else None
            sims.append(SimRequest(arrival=t, height=r["height"], width=r["width"], steps=r["steps"],
                                   slo_ms=r["slo_ms"], priority=level.get("priority", 0), step_mode="auto",
                                   model=light, min_quality=level.get("min_quality"), steps_run=steps_run,
                                   slo_class=r["slo_class"]))
        spec = CascadeSpec(light, self.cascade.get("heavy", contract.UNET),
                           escalation_rate=self._escalation(), seed=seed,
                           heavy_gpus=self.heavy_gpus) if self.cascade else None
        self.controller_state = controller
        result = simulate(sims, self.gpus, self.make, self.latency, cascade=spec)
        s = result.summary
        met = s["met"]
        return {"attainment": round(met / len(sims), 4), "goodput_rps": round(met / window, 3)}

    def _escalation(self) -> float:
        """With no controller, the fixed threshold's escalation (the options' nearest; else none)."""
        if not self.options:
            return 0.0
        threshold = self.cascade.get("threshold", 0.5)
        return min(self.options, key=lambda o: abs(o["threshold"] - threshold))["escalation"]


# ---- perf_analyzer cross-check ---------------------------------------------------------------------
def explicit(request: dict) -> dict:
    """perf_analyzer sends every input: the server's defaults where the request leaves one out (min_steps 1
    for step_mode auto is the same as none: the quality floor still applies)."""
    auto = request.get("step_mode") == "auto"
    return {"negative_prompt": "", "guidance_scale": 7.5, "scheduler": "euler", "stream": False, "priority": 0,
            "min_steps": 1 if auto else request["steps"], "step_mode": "fixed", "preview_every": 0, "unet": "default",
            **request}

def perf_analyzer_check(served: Served, rate: float, seed: int, classes: dict, args, workdir: Path) -> dict | None:
    from perf.perf_analyzer_slo import HarnessError, perf_analyzer_path, run_load as pa_run
    from perf.workloads import perf_analyzer_input_data, write_request_intervals

    try:
        perf_analyzer_path()
    except HarnessError as exc:
        return {"skipped": str(exc)}
    window = max(args.min_window_s, args.min_requests / rate)
    arrivals = poisson_arrivals(rate, window, seed)
    requests = for_system(sample(len(arrivals), seed, classes), served.system)
    (workdir / f"pa-{served.system}").mkdir(parents=True, exist_ok=True)
    intervals = write_request_intervals(arrivals, workdir / f"pa-{served.system}.txt")
    data = perf_analyzer_input_data([explicit(r) for r in requests])
    try:
        latencies, seconds = pa_run(served.url, data, model=served.model, intervals=intervals, requests=len(arrivals),
                                    streaming=False, workdir=workdir / f"pa-{served.system}")
    except HarnessError as exc:
        return {"failed": str(exc)}
    latencies = sorted(latencies)
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)
    mine = point(served, rate, seed, classes, args)
    return {"rate": rate, "perf_analyzer": {"requests": len(latencies), "p50_ms": pct(0.5), "p99_ms": pct(0.99)},
            "generator": {"requests": mine["sent"], "p50_ms": mine["p50_ms"], "p99_ms": mine["p99_ms"]}}


# ---- the run ---------------------------------------------------------------------------------------
def prepare(workdir: Path, args) -> Path:
    repo = workdir / "repo"
    run = lambda *cmd: subprocess.run([sys.executable, "-m", *cmd], check=True, cwd=ROOT)
    log("export: registry tiny family with the baselines")
    run("triffusion.export", "build", "--registry", str(REGISTRY), "--family", "tiny", "--baselines", "--out", str(repo))
    log("profile: step-quality curves and the entropy stop per SLO class")
    run("perf.profile_steps", "--repo", str(repo), "--steps", "2,4,6,8,10,14,20,30", "--n", str(args.profile_n),
        "--write", "--out", str(workdir / "profile_steps.json"))
    log("gate: trained on the cascade's own answers (heavy = real, light = generated)")
    run("perf.train_gate", "--repo", str(repo), "--n", str(args.gate_n), "--steps", "20",
        "--out", str(workdir / "train_gate.json"), "--write")
    log("profile: the cascade's operating points (thresholds by escalation fraction)")
    run("perf.profile_cascade", "--repo", str(repo), "--steps", "12,20", "--escalate", "0,0.25,0.5,0.75",
        "--n", str(args.cascade_n), "--out", str(workdir / "profile_cascade.json"), "--write")
    return repo


def commit() -> str | None:
    """The code measured: the checkout's commit, with "+dirty" when it has uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def orchestrator_sets(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` items as orchestrator parameters, each checked against OrchestratorConfig."""
    from triffusion.orchestrator.config import OrchestratorConfig

    sets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"'{item}' is not KEY=VALUE")
        sets[key] = value
    config = OrchestratorConfig.from_parameters(sets)  # unknown keys and bad values are named
    return {key: getattr(config, key) for key in sets}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.slo_proof", description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--start-rate", type=float, default=2.0)
    ap.add_argument("--baseline-start-rate", type=float, default=0.5)
    ap.add_argument("--step", type=float, default=1.35, help="rate multiplier between sweep points")
    ap.add_argument("--max-rate", type=float, default=80.0)
    ap.add_argument("--min-requests", type=int, default=100, help="requests per sweep point at least")
    ap.add_argument("--min-window-s", type=float, default=8.0)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="a request unanswered this long is lost")
    ap.add_argument("--calibration-rate", type=float, default=4.0,
                    help="the simulator's calibration point (req/s; another seed; not a sweep rate)")
    ap.add_argument("--profile-n", type=int, default=6)
    ap.add_argument("--gate-n", type=int, default=48, help="prompts the gate is trained on (both models answer)")
    ap.add_argument("--cascade-n", type=int, default=24, help="prompts per model and step count in the cascade profile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repo", help="a repository prepared by an earlier run (skips export and profiling)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an orchestrator parameter for every served system of the run, over the full config")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        FULL.update(orchestrator_sets(args.set))
    except ValueError as exc:
        ap.error(f"--set: {exc}")
    near = [r for r in sweep_rates(args.start_rate, args.step, args.max_rate)
            if abs(r - args.calibration_rate) <= 0.01 * args.calibration_rate]
    if args.calibration_rate <= 0 or near:  # the simulator must not learn from a rate it then predicts
        ap.error(f"--calibration-rate: {args.calibration_rate:g} is not allowed; allowed a rate > 0 that the full "
                 "system's sweep does not run" + (f" (it runs {near[0]:g})" if near else ""))
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)}; allowed: {', '.join(SYSTEMS)}")
    workdir = Path(tempfile.mkdtemp(prefix="slo_proof-"))
    started = time.time()
    repo = Path(args.repo) if args.repo else prepare(workdir, args)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    classes = pipeline["limits"]["slo_classes"]
    report = {"bench": "slo_proof", "device": device_name("cpu"), "date": time.strftime("%Y-%m-%d"), "commit": commit(),
              "command": "python -m perf.slo_proof " + " ".join(argv if argv is not None else sys.argv[1:]),
              "target": TARGET, "mix": MIX, "slo_classes": classes, "full_config": FULL, "systems": {},
              "step_quality": pipeline.get("step_quality"), "auto_stop": pipeline.get("auto_stop"),
              "cascade": pipeline.get("cascade"), "gate": pipeline.get("gate")}
    limits: dict[str, float | None] = {}
    for system in systems:
        log(f"system {system}")
        with Served(repo, system, workdir) as served:
            entry: dict = {}
            predict = None
            if system == "full":
                # Calibration at another load and seed: what the simulator learns the server's speed from.
                # A rate no point of the sweep runs (4/s by default). Tried at saturation (32/s): the server learned
                # an iteration scale of 1.04 there, no slower than at 4/s, and the simulator still put the full
                # system's last points at 100% where the server, more cautious after its sweep, refused a quarter.
                calib = point(served, args.calibration_rate, args.seed + 1000, classes, args)
                learned = served.control("profile")
                learned.pop("code", None)
                entry["learned_profile"] = json.loads(json.dumps(learned))  # what the simulator is fed, kept
                entry["calibration"] = {k: calib[k] for k in ("rate", "attainment", "goodput_rps", "sent")}
                entry["calibration"]["iteration_scale"] = learned.get("iteration_scale")
                exported = json.loads((repo / contract.ORCHESTRATOR / "1" / "profile.json").read_text())
                model = Predictor(pipeline, exported, learned, classes)
                entry["calibration"]["served_scales"] = model.served_scales
                entry["calibration"]["side_share"] = learned.get("side_share")

                def predict(rate: float, seed: int) -> dict:
                    # The server's controller carries its demand estimate and operating point from one point to
                    # the next (each point starts with what the last one and the pause left); the simulated one
                    # starts from there. Read before the point runs; the seconds this prediction takes are idle
                    # time the read does not count (they only stretch the window the controller is counting).
                    state = served.control("profile").get("controller")
                    return {**model(rate, seed, args, controller=state), "controller_start": state}
            rows, limit = sweep(served, classes, args, predict)
            limits[system] = limit
            entry.update(sweep=rows, max_load_at_99=limit)
            base = limit or (args.start_rate if SYSTEMS[system] is not None else args.baseline_start_rate)
            entry["traces"] = {}
            for name, arrivals in (("gamma_cv4", gamma_arrivals(0.7 * base, 4.0, 30.0, args.seed + 500)),
                                   ("maf", maf_arrivals(0.7 * base, 30.0, args.seed + 501))):
                entry["traces"][name] = point(served, 0.7 * base, args.seed + 502, classes, args,
                                              arrivals=arrivals, window=30.0)
                log(f"{system} {name} at {0.7 * base:.2f}/s: attainment {entry['traces'][name]['attainment']}")
            if system == "full" and limit:
                entry["bursts"] = bursts(served, limit, classes, args)
                entry["overload"] = {}
                for factor in (2, 3):
                    row = point(served, factor * limit, args.seed + 600 + factor, classes, args)
                    entry["overload"][f"{factor}x"] = row
                    log(f"full overload {factor}x: goodput {row['goodput_rps']} admitted attainment "
                        f"{row['admitted_attainment']}")
            entry["perf_analyzer"] = perf_analyzer_check(served, 0.5 * base, args.seed + 700, classes, args, workdir)
            report["systems"][system] = entry
    report.update(summarize(report, limits))
    report["elapsed_s"] = round(time.time() - started, 1)
    print(json.dumps({k: report[k] for k in ("max_load_at_99", "ratios", "burst", "overload", "simulator_error_max",
                                             "controller")},
                     indent=1))
    write_json(args.out, report)
    return 0


def bursts(served: Served, capacity: float, classes: dict, args) -> dict:
    """Three 1 s bursts at 5x capacity, each followed by 3 s at 0.2x."""
    arrivals, t = [], 0.0
    for k in range(3):
        arrivals += [t + a for a in poisson_arrivals(5 * capacity, 1.0, args.seed + 800 + k)]
        t += 1.0
        arrivals += [t + a for a in poisson_arrivals(0.2 * capacity, 3.0, args.seed + 810 + k)]
        t += 3.0
    before = served.control("heap")
    row = point(served, 5 * capacity, args.seed + 820, classes, args, arrivals=arrivals, window=t)
    after = served.control("heap")
    # The orchestrator's garbage collections during the bursts, per generation, and the longest of each since
    # start-up (triffusion.heap: start-up's objects are frozen, so a full collection no longer stalls ~130 ms).
    row["gc"] = {"collections": [b - a for a, b in zip(before["collections"], after["collections"])],
                 "longest_ms_since_start": after["longest_ms"], "frozen": after["frozen"]}
    log(f"full bursts: admitted attainment {row['admitted_attainment']}, rejection p99 {row['reject_p99_ms']} ms, "
        f"gc {row['gc']}")
    return row


def summarize(report: dict, limits: dict) -> dict:
    full = report["systems"].get("full", {})
    ratio = lambda a, b: round(a / b, 2) if a and b else None
    peak = max((r["goodput_rps"] for r in full.get("sweep", [])), default=None)
    overload = full.get("overload", {})
    errors = []
    for row in full.get("sweep", []):
        if "predicted" in row and row["attainment"]:
            for metric in ("attainment", "goodput_rps"):
                measured, predicted = row[metric], row["predicted"][metric]
                if measured:
                    errors.append(abs(predicted - measured) / measured)
                    row.setdefault("prediction_error", {})[metric] = round(abs(predicted - measured) / measured, 4)
    bursts = full.get("bursts", {})
    seen = {}  # every decision the controller made during any point of the full system, with the rates it made it at
    rows = [*full.get("sweep", []), *full.get("overload", {}).values(), *([bursts] if bursts else [])]
    for row in rows:
        for d in (row.get("controller_during") or {}).get("decisions", []):
            seen.setdefault((d["threshold"], d["steps"]), {"threshold": d["threshold"], "steps": d["steps"],
                                                           "expected_escalation": d["expected_escalation"],
                                                           "at_rates": []})["at_rates"].append(row.get("rate"))
    return {
        "controller": {"decisions": list(seen.values()), "changed_with_load": len(seen) > 1},
        "max_load_at_99": limits,
        "ratios": {f"full_over_{s}": ratio(limits.get("full"), limits.get(s)) for s in limits if s != "full"},
        "burst": {"admitted_attainment": bursts.get("admitted_attainment"), "reject_p99_ms": bursts.get("reject_p99_ms"),
                  "sent": bursts.get("sent"), "rejected": bursts.get("rejected")},
        "overload": {"goodput_2x_over_peak": ratio(overload.get("2x", {}).get("goodput_rps"), peak),
                     "goodput_3x_over_peak": ratio(overload.get("3x", {}).get("goodput_rps"), peak),
                     "admitted_attainment_2x": overload.get("2x", {}).get("admitted_attainment"),
                     "admitted_attainment_3x": overload.get("3x", {}).get("admitted_attainment"),
                     "peak_goodput_rps": peak},
        "simulator_error_max": round(max(errors), 4) if errors else None,
    }


if __name__ == "__main__":
    raise SystemExit(main())
