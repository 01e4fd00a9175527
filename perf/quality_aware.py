"""Quality-aware compute against fixed steps, side by side in one run, and the simulator checked against it.

    fixed_50       every request runs the heavy (default) UNet for --steps steps
    auto_cascade   step_mode auto (entropy early stop + one last step) on the cascade: the light UNet
                   answers first, the quality_gate model scores it, low scores are redone on the heavy one

The gate's threshold is fixed so that a chosen fraction escalates: a calibration pass serves cascade
requests with threshold 0 (nothing escalates, every light answer is scored), `calibrate_threshold`
picks the score under which --escalate of them fall, and the server restarts with that threshold.
Each policy then meets Poisson load at each rate (perf/overload.py: every request counted as ok,
late or rejected); goodput at 99% is the highest goodput among the rates whose attainment reached
0.99. The simulator replays the same arrivals from the export's measured profile with the same
scheduler classes, and its attainment and throughput are compared with the measured ones.

GPU host (SD1.5 + BK-SDM-small-style light UNet, random weights):
    python -m perf.quality_aware --preset sd15 --light sd15-small --device cuda --size 512 --steps 50 \
        --slo-ms 3000 --rates 1,2,3,4,6 --duration 30 --escalate 0.3 --out perf/results/quality_aware_h100.json
CPU smoke (tiny):
    python -m perf.quality_aware --preset tiny --light tiny-lite --size 64 --steps 10 --slo-ms 3000 \
        --rates 1,4,8 --duration 8 --calibration 24
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from perf.cli import OneLineParser, device_name
from perf.overload import run_load
from perf.simulator import CascadeSpec, LatencyModel, SimRequest, scheduler_factory, simulate, validate
from perf.workloads import load_prompts, poisson_arrivals
from triffusion import contract
from triffusion.client import generate
from triffusion.export.build import build
from triffusion.export.presets import variant_model_name
from triffusion.export.repository import write_repository
from triffusion.orchestrator.gate import calibrate_threshold
from triffusion.server import TritonServer, free_port

POLICIES = {"fixed_50": {"step_mode": "fixed", "unet": "default"},
            "auto_cascade": {"step_mode": "auto", "unet": contract.CASCADE}}


def start(repo: Path) -> TritonServer:
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.__enter__()
    server.wait_ready(timeout_s=900)
    return server


def orchestrator_params(gpu: bool, threshold: float, max_active: int) -> dict:
    params = {"cascade_threshold": threshold, "max_active": max_active}
    if gpu:  # what write_repository gives a torch GPU export by default, stated again because we override
        params.update({"unet_executor": "inprocess", "runtime": "torch", "device": "cuda"})
    return params


def calibrate(url: str, prompts: list[str], n: int, size: int, steps: int, escalate: float) -> tuple[float, list]:
    """Gate scores of light answers (threshold 0: none escalates) -> the threshold escalating `escalate`."""
    scores = []
    for i in range(n):
        result = generate(prompts[i % len(prompts)], url=url, height=size, width=size, steps=steps, seed=10_000 + i,
                          unet=contract.CASCADE, step_mode="auto")
        scores.append(result.metadata["cascade"]["score"])
    return calibrate_threshold(scores, escalate), scores


def requests_for(policy: str, prompts: list[str], n: int, size: int, steps: int, slo_ms: int) -> list[dict]:
    return [{"prompt": prompts[i % len(prompts)], "height": size, "width": size, "steps": steps, "seed": i,
             "slo_ms": slo_ms, **POLICIES[policy]} for i in range(n)]


def measure(url: str, policy: str, prompts, rates, duration: float, size: int, steps: int, slo_ms: int,
            heavy: str) -> dict:
    rows = {}
    for rate in rates:
        arrivals = poisson_arrivals(rate, duration, seed=int(rate * 1000))
        result = asyncio.run(run_load(url, requests_for(policy, prompts, len(arrivals), size, steps, slo_ms),
                                      arrivals, timeout_s=max(120.0, 20 * slo_ms / 1000)))
        summary = result.summary()
        answered = [r for r in result.records if r.outcome in ("ok", "late")]
        summary["throughput_rps"] = round(len(answered) / max(result.duration_s, 1e-9), 4)
        summary["avg_steps"] = round(statistics.mean(r.steps_done for r in answered), 3) if answered else None
        summary["escalation_rate"] = (round(sum(r.unet == heavy for r in answered) / len(answered), 4)
                                      if answered and policy == "auto_cascade" else None)
        summary["arrivals"] = arrivals
        rows[f"{rate:g}"] = summary
        print(f"{policy:13s} rate {rate:g}/s: attainment {summary['attainment']}, goodput {summary['goodput_rps']}/s, "
              f"avg steps {summary['avg_steps']}, escalation {summary['escalation_rate']}, "
              f"rejected {summary['rejected']}", flush=True)
    return rows


def goodput_at_99(rows: dict) -> float:
    met = [row["goodput_rps"] for row in rows.values() if row["attainment"] >= 0.99]
    return max(met) if met else 0.0


def simulated(profile: dict, rows: dict, policy: str, size: int, steps: int, slo_ms: int, max_active: int,
              light: str, heavy: str) -> dict:
    """The simulator on the measured arrivals, with the measured early-stop steps and escalation rate."""
    out = {}
    for rate, row in rows.items():
        answered_steps = row["avg_steps"] or steps
        cascade = None
        model = heavy
        if policy == "auto_cascade":
            model = light
            cascade = CascadeSpec(light, heavy, escalation_rate=row["escalation_rate"] or 0.0, seed=0)
        # auto_cascade: the latent settles at the measured mean steps; the scheduler's entropy stop ends it.
        auto = POLICIES[policy]["step_mode"] == "auto"
        requests = [SimRequest(arrival=t, height=size, width=size, steps=steps, slo_ms=slo_ms, model=model,
                               step_mode=POLICIES[policy]["step_mode"],
                               steps_run=max(1, round(answered_steps)) if auto else None)
                    for t in row["arrivals"]]
        result = simulate(requests, 1, scheduler_factory(profile, "edf", max_active=max_active), LatencyModel(profile),
                          cascade=cascade)
        out[rate] = {"attainment": result.summary["attainment"], "throughput_rps": result.summary["throughput_rps"]}
    return {"rates": out}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.quality_aware", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--light", default="tiny-lite")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--slo-ms", type=int, default=3000)
    ap.add_argument("--rates", default="1,3")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--escalate", type=float, default=0.3, help="fraction of light answers the gate escalates")
    ap.add_argument("--calibration", type=int, default=64,
                    help="light answers scored to fix the threshold (the measured escalation rate then lands "
                         "within about sqrt(p(1-p)/n) of --escalate: +-0.06 at 64)")
    ap.add_argument("--max-active", type=int, default=16)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    rates = [float(r) for r in args.rates.split(",") if r]
    repo = (args.workdir or Path(tempfile.mkdtemp(prefix="quality_aware-"))) / "model_repository"
    info = build(args.preset, None, repo, random_weights=True, runtime="torch" if gpu else "onnxruntime",
                 sizes=[args.size], fp16=gpu, device="cuda" if gpu else "cpu", unet_variants=(args.light,),
                 cascade={"light": args.light, "threshold": 0.0})
    light, heavy = variant_model_name(args.light), contract.UNET
    prompts = load_prompts()
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    write_repository(repo, pipeline, runtime="torch" if gpu else "onnxruntime", device="cuda" if gpu else "cpu",
                     orchestrator=orchestrator_params(gpu, 0.0, args.max_active))
    server = start(repo)
    try:
        threshold, scores = calibrate(server.urls["grpc"], prompts, args.calibration, args.size, args.steps,
                                      args.escalate)
    finally:
        server.__exit__(None, None, None)
    print(f"gate threshold {threshold:.6f}: escalates {args.escalate:.0%} of {len(scores)} calibration answers",
          flush=True)
    write_repository(repo, pipeline, runtime="torch" if gpu else "onnxruntime", device="cuda" if gpu else "cpu",
                     orchestrator=orchestrator_params(gpu, threshold, args.max_active))
    server = start(repo)
    try:
        url = server.urls["grpc"]
        for size_warm in range(2):  # unrecorded: first calls pay for allocation and kernel selection
            generate("warm up", url=url, height=args.size, width=args.size, steps=args.steps, seed=size_warm,
                     unet=contract.CASCADE, step_mode="auto")
        measured = {policy: measure(url, policy, prompts, rates, args.duration, args.size, args.steps, args.slo_ms,
                                    heavy) for policy in POLICIES}
    finally:
        server.__exit__(None, None, None)
    profile = json.loads((repo / contract.ORCHESTRATOR / "1" / "profile.json").read_text())
    checks = {policy: validate(simulated(profile, measured[policy], policy, args.size, args.steps, args.slo_ms,
                                         args.max_active, light, heavy), {"rates": measured[policy]})
              for policy in POLICIES}
    errors = [e for check in checks.values() for e in check["max_rel_error"].values()]
    cascade_rows = [row for row in measured["auto_cascade"].values() if row["avg_steps"] is not None]
    report = {
        "bench": "quality_aware", "device": device_name(args.device), "preset": args.preset, "light": args.light,
        "random_weights": True, "size": args.size, "steps": args.steps, "slo_ms": args.slo_ms,
        "date": time.strftime("%Y-%m-%d"),
        "goodput_at_99": {policy: goodput_at_99(measured[policy]) for policy in POLICIES},
        "avg_steps": round(statistics.mean(r["avg_steps"] for r in cascade_rows), 3) if cascade_rows else None,
        "escalation_rate": (round(statistics.mean(r["escalation_rate"] for r in cascade_rows), 4)
                            if cascade_rows else None),
        "escalate_target": args.escalate, "gate_threshold": threshold,
        "calibration_scores": [round(float(x), 6) for x in scores],
        "simulator_rel_error": round(max(errors), 4) if errors else None,
        "simulator": checks,
        "measured": {policy: {rate: {k: v for k, v in row.items() if k != "arrivals"} for rate, row in rows.items()}
                     for policy, rows in measured.items()},
        "gate": info.get("gate"),
    }
    fixed, auto = report["goodput_at_99"]["fixed_50"], report["goodput_at_99"]["auto_cascade"]
    print(json.dumps({k: report[k] for k in ("goodput_at_99", "avg_steps", "escalation_rate", "simulator_rel_error")}))
    print(f"auto_cascade vs fixed_50: {auto / fixed if fixed else float('inf'):.2f}x goodput at 99% SLO attainment; "
          f"avg steps {report['avg_steps']}, escalation {report['escalation_rate']}, "
          f"simulator error {report['simulator_rel_error']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
