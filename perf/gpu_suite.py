"""The GPU-host acceptance suite in one command: the issue-13 benchmarks at sizes that fit a time budget
(8 minutes with the install on a GPU host), every benchmark's own JSON, one summary JSON
(gpu_suite_<gpu>.json) and one summary line. `bash perf/gpu_suite.sh` installs the offline bundle first
where the project is not importable; `DEVICE=cpu` runs the same steps on the tiny preset (CI does, so the
suite cannot rot).

    unet_serving            server vs in-process UNet step at 2/8/16 rows, 50-step 512x512 end to end
    orchestration_overhead  one BLS round trip per UNet step against the UNet's own compute
    slo_bench               the orchestrator against both baselines under perf_analyzer (SLO attainment)
    quality_aware           auto steps + cascade against fixed steps, and the simulator's error

Each step runs as its own process (its servers and GPU memory go with it) under a deadline: past it the
step gets SIGINT (its servers stop), then SIGKILL. A step that fails or does not fit the budget is
recorded with its reason and the suite goes on; the summary says which steps ran.

    python -m perf.gpu_suite --device cuda [--out-dir perf/results] [--budget-s 480] [--steps a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from perf.cli import device_name
from triffusion.procs import default_sigint

STEPS = ("unet_serving", "orchestration_overhead", "slo_bench", "quality_aware")
ROOT = Path(__file__).resolve().parents[1]

# What fits: on a GPU host the SD1.5 architecture (random weights) as the acceptance asks, with short load
# runs; on the CPU the tiny preset with a few steps and requests (a dry run of the plumbing, not figures).
SIZES = {
    "cuda": {"unet_serving": {"preset": "sd15", "size": 512, "rows": "2,8,16", "steps": 50, "repeats": 20, "limit_s": 240},
             "orchestration_overhead": {"jobs": 4, "size": 512, "steps": 20, "limit_s": 150},
             # the sequential baseline answers ~0.45 images/s: 12 requests at 2/s keep its run near 30 s
             "slo_bench": {"preset": "sd15", "sizes": "512", "mix": "sd15-interactive", "slo_ms": 3000, "rates": "2",
                           "requests": 4, "limit_s": 150},
             "quality_aware": {"preset": "sd15", "light": "sd15-small", "size": 512, "steps": 25, "slo_ms": 3000,
                               "rates": "2,4", "duration": 8, "calibration": 16, "limit_s": 150},
             "min_step_s": 45, "budget_s": 480},
    # about 3.5 minutes on an idle 2-core machine; the limits leave room for a busy one
    "cpu": {"unet_serving": {"preset": "tiny", "size": 64, "rows": "2,4", "steps": 4, "repeats": 3, "limit_s": 180},
            "orchestration_overhead": {"jobs": 2, "size": 64, "steps": 4, "limit_s": 180},
            "slo_bench": {"preset": "tiny", "sizes": "", "mix": "tiny-smoke", "slo_ms": 4000, "rates": "4",
                          "requests": 4, "limit_s": 240},
            "quality_aware": {"preset": "tiny", "light": "tiny-lite", "size": 64, "steps": 4, "slo_ms": 3000,
                              "rates": "2", "duration": 2, "calibration": 8, "limit_s": 180},
            "min_step_s": 10, "budget_s": 900},
}


@dataclass
class Step:
    name: str
    commands: list[list[str]]
    limit_s: float
    attempts: int = 1  # perf_analyzer gives up on a run it finds unstable on a busy machine: slo_bench gets two


def machine_tag(device: str) -> str:
    """File-name tag of the machine: the GPU's model ('NVIDIA H200' -> 'h200'), or 'cpu'."""
    if not device.startswith("cuda"):
        return "cpu"
    words = [w for w in device_name(device).lower().replace("-", " ").split() if w not in ("nvidia", "tesla")]
    return words[0] if words else "gpu"


def accepts(py: str, module: str, flag: str) -> bool:
    """Whether a benchmark's command line takes `flag` (they grow options; the suite passes what they take)."""
    done = subprocess.run([py, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    return flag in done.stdout


def plan(device: str, py: str, work: Path, out: Path, tag: str) -> list[Step]:
    sizes = SIZES["cuda" if device.startswith("cuda") else "cpu"]
    gpu = device.startswith("cuda")
    u, o, s, q = (sizes[name] for name in STEPS)
    unet_json = out / f"unet_serving_{tag}.json"
    steps = [Step("unet_serving", [[py, "-m", "perf.unet_serving", "--preset", u["preset"], "--device", device,
                                    "--size", str(u["size"]), "--rows", u["rows"], "--steps", str(u["steps"]),
                                    "--repeats", str(u["repeats"]), "--workdir", str(work / "unet_serving"),
                                    "--out", str(unet_json)]], u["limit_s"])]
    # The BLS/in-process comparison on a repository of the served runtime: on a GPU the torch export that
    # unet_serving made (SD1.5, CUDA graphs: orchestration_overhead must keep that runtime when it rewrites
    # the configs); on the CPU an ONNX export of the tiny preset.
    overhead_json = out / f"orchestration_overhead_{tag}.json"
    commands = []
    if gpu:
        repo = work / "unet_serving" / "model_repository"
    else:
        repo = work / "onnx" / "model_repository"
        commands.append([py, "-m", "triffusion.export", "build", "--preset", "tiny", "--out", str(repo),
                         "--no-profile"])
    bench = [py, "-m", "perf.orchestration_overhead", "--repo", str(repo), "--jobs", str(o["jobs"]),
             "--size", str(o["size"]), "--steps", str(o["steps"]), "--out", str(overhead_json)]
    if accepts(py, "perf.orchestration_overhead", "--device"):
        bench += ["--device", device]
    steps.append(Step("orchestration_overhead", commands + [bench], o["limit_s"]))
    slo_dir = out / f"slo_bench_{tag}"
    slo = [py, "-m", "perf.slo_bench", "--serve", s["preset"], "--device", device, "--mix", s["mix"],
           "--slo-ms", str(s["slo_ms"]), "--rates", s["rates"], "--requests", str(s["requests"]), "--out-dir", str(slo_dir)]
    if s["sizes"]:
        slo += ["--sizes", s["sizes"]]
    steps.append(Step("slo_bench", [slo], s["limit_s"], attempts=2))
    quality_json = out / f"quality_aware_{tag}.json"
    steps.append(Step("quality_aware", [[py, "-m", "perf.quality_aware", "--preset", q["preset"], "--light", q["light"],
                                         "--device", device, "--size", str(q["size"]), "--steps", str(q["steps"]),
                                         "--slo-ms", str(q["slo_ms"]), "--rates", q["rates"],
                                         "--duration", str(q["duration"]), "--calibration", str(q["calibration"]),
                                         "--escalate", "0.3", "--workdir", str(work / "quality_aware"),
                                         "--out", str(quality_json)]], q["limit_s"]))
    return steps


def stop(process: subprocess.Popen) -> None:
    """Stop a step's process group: SIGINT first (its servers shut down), then SIGKILL."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_command(command: list[str], timeout_s: float, log: Path) -> tuple[int | None, str]:
    """Run one command in its own process group; (exit code or None on timeout, last lines of its output)."""
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=default_sigint)
        try:
            code = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            code = None
            stop(process)
        except BaseException:  # the suite itself is stopped (SIGINT, SIGTERM): so is its step
            stop(process)
            raise
    lines = log.read_text(errors="replace").splitlines()
    return code, "\n".join(lines[-15:])


def run_step(step: Step, deadline: float, min_step_s: float, logs: Path) -> dict:
    start = time.monotonic()
    log = logs / f"{step.name}.log"
    for attempt in range(1, step.attempts + 1):
        result = _attempt(step, deadline, min_step_s, log, time.monotonic())
        if result["status"] != "failed" or attempt == step.attempts:
            break
    result["seconds"] = round(time.monotonic() - start, 1)
    if attempt > 1:
        result["attempts"] = attempt
    return result


def _attempt(step: Step, deadline: float, min_step_s: float, log: Path, start: float) -> dict:
    for command in step.commands:
        left = deadline - time.monotonic()
        if left < min_step_s:
            return {"status": "skipped", "reason": f"{left:.0f} s of the budget left, a step needs {min_step_s:.0f}"}
        code, tail = run_command(command, min(step.limit_s - (time.monotonic() - start), left), log)
        if code != 0:
            why = "timed out" if code is None else f"exit code {code}"
            return {"status": "failed", "reason": f"{' '.join(command[:3])}: {why}", "log_tail": tail}
    return {"status": "ok"}


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def slo_summary(folder: Path) -> dict | None:
    """The SLO comparison: the report's summary.json where it was written, else the raw results."""
    for name in ("summary.json", "results.json"):
        found = sorted(folder.glob(f"*/{name}"))
        if found:
            data = load(found[-1])
            if data is not None:
                systems = data.get("systems", {})
                return {"file": str(found[-1]), "slo_ms": data.get("slo_ms"),
                        "max_rate_at_99": {k: v.get("max_rate_at_99") for k, v in systems.items()},
                        "goodput_rps": {k: v.get("goodput_rps") for k, v in systems.items()},
                        **({"ratios": data["ratios"]} if "ratios" in data else {})}
    return None


def summarize(device: str, out: Path, tag: str, steps: dict, started: float, install_s: float, budget_s: float) -> dict:
    gpu = device.startswith("cuda")
    unet = load(out / f"unet_serving_{tag}.json") or {}
    overhead = load(out / f"orchestration_overhead_{tag}.json") or {}
    quality = load(out / f"quality_aware_{tag}.json") or {}
    e2e_key = next((k for k in unet if k.startswith("e2e_") and k != "e2e_50step_512_s"), None)
    report = {
        "bench": "gpu_suite", "device": f"cuda:{device_name(device)}" if gpu else "cpu", "machine": device_name(device),
        "date": time.strftime("%Y-%m-%d"), "budget_s": budget_s, "install_s": round(install_s, 1),
        "wall_s": round(time.time() - started, 1),
        "unet_serving": {"server_step_ms": unet.get("server_step_ms"), "inprocess_step_ms": unet.get("inprocess_step_ms"),
                         "server_over_inprocess": unet.get("server_over_inprocess"),
                         "e2e_50step_512_s": unet.get("e2e_50step_512_s"),
                         "e2e_s": unet.get(e2e_key) if e2e_key else None,
                         "preset": unet.get("preset"), "size": unet.get("size"), "steps": unet.get("steps"),
                         "rows_not_reached": unet.get("rows_not_reached")},
        "orchestration_overhead_pct": overhead.get("orchestration_overhead_pct"),
        "orchestration_overhead": overhead.get("modes"),
        "slo_bench": slo_summary(out / f"slo_bench_{tag}"),
        "quality_aware": {k: quality.get(k) for k in ("goodput_at_99", "avg_steps", "escalation_rate",
                                                      "simulator_rel_error")} if quality else None,
        "steps": steps,
    }
    if gpu:  # issue 13's GPU acceptance, read off the figures above
        ratios = [r for r in (unet.get("server_over_inprocess") or {}).values() if r is not None]
        e2e, pct = unet.get("e2e_50step_512_s"), overhead.get("orchestration_overhead_pct")
        report["acceptance"] = {
            "server_over_inprocess_max": max(ratios) if ratios else None,
            "server_step_within_1_15x": bool(ratios) and len(ratios) == 3 and max(ratios) <= 1.15,
            "e2e_50step_512_under_0_75_s": e2e is not None and e2e < 0.75,
            "overhead_within_5_pct": pct is not None and pct <= 5.0}
    return report


def summary_line(report: dict, path: Path) -> str:
    unet, parts = report["unet_serving"], []
    ratios = unet.get("server_over_inprocess") or {}
    if ratios:
        parts.append("server/in-process " + " ".join(f"b{r} {v:.2f}x" if v is not None else f"b{r} n/a"
                                                     for r, v in ratios.items()))
    e2e = unet.get("e2e_50step_512_s") or unet.get("e2e_s")
    if e2e is not None:
        parts.append(f"e2e {unet.get('steps')}-step {unet.get('size')}px {e2e:.3f} s")
    if report["orchestration_overhead_pct"] is not None:
        parts.append(f"BLS overhead {report['orchestration_overhead_pct']}%")
    slo = report["slo_bench"]
    if slo:
        parts.append("max rate @99% " + ", ".join(f"{k} {v}" for k, v in slo["max_rate_at_99"].items()))
    quality = report["quality_aware"]
    if quality and quality.get("goodput_at_99"):
        parts.append("goodput@99 " + ", ".join(f"{k} {v}" for k, v in quality["goodput_at_99"].items()))
    ok = sum(s["status"] == "ok" for s in report["steps"].values())
    bad = [f"{n} {s['status']}" for n, s in report["steps"].items() if s["status"] != "ok"]
    return (f"gpu_suite {report['device']}: " + "; ".join(parts or ["no figures"])
            + f"; {ok}/{len(report['steps'])} steps ok{' (' + ', '.join(bad) + ')' if bad else ''}"
            + f" in {report['wall_s']:.0f} s -> {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.gpu_suite", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "perf" / "results")
    ap.add_argument("--budget-s", type=float, help="the whole suite, install included (default 480 on a GPU)")
    ap.add_argument("--started", type=float, help="when the suite started (epoch s; the shell script passes it, "
                                                  "so that the install counts)")
    ap.add_argument("--steps", default=",".join(STEPS), help="a subset, comma-separated")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the exports and logs (default: logs only)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped suite stops its step too (it runs in its own session)
    sizes = SIZES["cuda" if args.device.startswith("cuda") else "cpu"]
    started = args.started or time.time()
    budget_s = args.budget_s or sizes["budget_s"]
    deadline = time.monotonic() + budget_s - (time.time() - started)
    install_s = time.time() - started
    wanted = [s for s in args.steps.replace(" ", ",").split(",") if s]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        ap.error(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = machine_tag(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    logs = work / "logs"
    logs.mkdir()
    results = {}
    try:
        for step in plan(args.device, sys.executable, work, out, tag):
            if step.name not in wanted:
                continue
            print(f"gpu_suite: {step.name} ...", flush=True)
            results[step.name] = run_step(step, deadline, sizes["min_step_s"], logs)
            print(f"gpu_suite: {step.name} {results[step.name]['status']} in {results[step.name]['seconds']} s"
                  + (f" ({results[step.name]['reason']})" if "reason" in results[step.name] else ""), flush=True)
    finally:
        if any(r["status"] != "ok" for r in results.values()):  # the logs of a run that did not go through
            shutil.copytree(logs, out / f"gpu_suite_{tag}_logs", dirs_exist_ok=True)
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
    report = summarize(args.device, out, tag, results, started, install_s, budget_s)
    path = out / f"gpu_suite_{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report, path), flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
