"""SLO load runs with perf_analyzer against the decoupled orchestrator over gRPC streaming.

    bash perf/install_perf_analyzer.sh
    python perf/perf_analyzer_slo.py --url localhost:8001 --rates 1,2,4 --slo-ms 2000 --size 64 --steps 10

Each rate is a Poisson run (`--request-rate-range R --request-distribution poisson`); the profile
export (`--profile-export-file`) is parsed into per-request latencies, from which SLO attainment,
goodput and p50/p90/p99 are computed."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from triffusion import contract


class HarnessError(RuntimeError):
    pass


def perf_analyzer_path(venv: Path = Path(sys.prefix)) -> str:
    for candidate in (venv / "bin" / "perf_analyzer", shutil.which("perf_analyzer")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise HarnessError("perf_analyzer not found: run `bash perf/install_perf_analyzer.sh`")


def input_data(prompts: list[str], *, size: int, steps: int, slo_ms: int, seed: int = 0) -> dict:
    """perf_analyzer --input-data JSON: every orchestrator input given explicitly (perf_analyzer would
    otherwise fill optional inputs with random data)."""
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append({"prompt": [prompt], "negative_prompt": [""], "height": [size], "width": [size],
                     "steps": [steps], "guidance_scale": [7.5], "seed": [seed + i], "scheduler": ["euler"],
                     "stream": [False], "slo_ms": [slo_ms], "slo_class": [""], "priority": [0], "min_steps": [steps],
                     "step_mode": ["fixed"], "preview_every": [0], "unet": ["default"]})
    names = {spec.name for spec in contract.REQUEST_INPUTS}
    assert all(set(row) == names for row in rows), "input data must name every orchestrator input"
    return {"data": rows}


EXPERIMENT = re.compile(rb'\{"experiment":\{"mode":"[a-z_]+","value":([0-9.]+)\}')
REQUEST = re.compile(rb'"timestamp":([0-9]+),(?:"sequence_id":[0-9]+,)?"response_timestamps":\[([0-9,]*)\]')


def parse_profile_export(path: Path) -> dict[float, list[float]]:
    """{request rate: [latency in ms of each request]} from perf_analyzer's profile export.

    The export embeds response outputs raw (our image bytes are not UTF-8), so it is read by its
    structure, not as JSON."""
    blob = Path(path).read_bytes()
    starts = [(m.start(), float(m.group(1))) for m in EXPERIMENT.finditer(blob)]
    if not starts:
        raise HarnessError(f"{path}: not a perf_analyzer profile export (no experiments)")
    result: dict[float, list[float]] = {}
    for i, (start, rate) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(blob)
        result[rate] = [(int(resp.split(b",")[-1]) - int(sent)) / 1e6
                        for sent, resp in REQUEST.findall(blob[start:end]) if resp]
    return result


def slo_summary(latencies_ms: list[float], slo_ms: float, duration_s: float, sent: int | None = None) -> dict:
    """Attainment counts requests without a response as misses when `sent` is given."""
    done = sorted(latencies_ms)
    total = max(sent if sent is not None else len(done), 1)
    met = sum(1 for x in done if x <= slo_ms)
    pick = lambda q: round(done[min(len(done) - 1, int(q * len(done)))], 1) if done else None
    return {"requests": total, "attainment": round(met / total, 4), "goodput_rps": round(met / duration_s, 4),
            "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99)}


def check_server(url: str, model: str) -> None:
    host, _, port = url.rpartition(":")
    try:
        socket.create_connection((host or "localhost", int(port)), timeout=3).close()
    except OSError:
        raise HarnessError(f"cannot reach the server at {url}") from None
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    if not client.is_model_ready(model):
        # The repository index is an admin API; name the models a benchmark can call instead.
        callable_ = (*contract.FRONTS, contract.BASELINE_BATCHING, contract.BASELINE_SEQUENTIAL)
        raise HarnessError(f"model '{model}' is not ready on {url}; served: "
                           + ", ".join(m for m in callable_ if client.is_model_ready(m)))


def _error_line(done: subprocess.CompletedProcess) -> str:
    """perf_analyzer prints its usage after an argument error: report the error line, not the usage."""
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    errors = [line.strip() for line in lines if "error" in line.lower()]
    return errors[0] if errors else (lines[-1].strip() if lines else f"exit status {done.returncode}")


def run_rate(url: str, rate: float, data: dict, *, model: str = contract.TEXT_TO_IMAGE_STREAM, requests: int = 10,
             workdir: Path | None = None) -> tuple[list[float], float]:
    """One Poisson run at `rate`; returns (latencies in ms, measured seconds)."""
    return run_load(url, data, model=model, rate=rate, requests=requests, workdir=workdir)


def run_load(url: str, data: dict, *, model: str = contract.TEXT_TO_IMAGE_STREAM, rate: float | None = None,
             intervals: Path | None = None, requests: int = 10, streaming: bool | None = None,
             workdir: Path | None = None) -> tuple[list[float], float]:
    """One perf_analyzer run, Poisson at `rate` or replaying an `intervals` trace (--request-intervals,
    microseconds per line); returns (latencies in ms, measured seconds). Decoupled models (the
    orchestrator) are driven over gRPC streaming, the others with async unary calls."""
    if (rate is None) == (intervals is None):
        raise HarnessError("give exactly one of a rate or an intervals file")
    check_server(url, model)
    workdir = Path(workdir or tempfile.mkdtemp())
    (workdir / "input.json").write_text(json.dumps(data))
    label = f"{rate}" if rate is not None else Path(intervals).stem
    export = workdir / f"profile_{model}_{label}.json"
    streaming = model == contract.TEXT_TO_IMAGE_STREAM if streaming is None else streaming
    load = (["--request-rate-range", str(rate), "--request-distribution", "poisson"] if rate is not None
            else ["--request-intervals", str(intervals)])
    if intervals is not None:
        # A window must span the trace's long gaps (perf_analyzer fails a window that sees no response):
        # three windows of a third of the trace each, at least `requests`.
        lines = sum(1 for line in Path(intervals).read_text().splitlines() if line.strip())
        requests = max(requests, -(-lines // 3))
    command = [perf_analyzer_path(), "-m", model, "-u", url, "-i", "grpc", *(["--streaming"] if streaming else []),
               "--input-data", str(workdir / "input.json"), *load, "--measurement-mode", "count_windows",
               "--measurement-request-count", str(requests), "--max-trials", "3", "--stability-percentage", "999",
               "--profile-export-file", str(export)]
    export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite one
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"perf_analyzer failed on {model} at {label}: {_error_line(done)}")
    runs = parse_profile_export(export)
    latencies = runs[rate] if rate is not None and rate in runs else next(iter(runs.values()))
    bounds = re.search(rb'"window_boundaries":\[([0-9,]+)\]', export.read_bytes())
    edges = [int(x) for x in bounds.group(1).split(b",")] if bounds else [0, 0]
    return latencies, max((edges[-1] - edges[0]) / 1e9, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--rates", default="1,2")
    ap.add_argument("--slo-ms", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--requests", type=int, default=20, help="requests per measurement window")
    ap.add_argument("--out")
    args = ap.parse_args()
    data = input_data([f"a lighthouse, take {i}" for i in range(32)], size=args.size, steps=args.steps,
                      slo_ms=10 * args.slo_ms)  # admission must not reject: perf_analyzer stops on an error
    report = {"bench": "perf_analyzer_slo", "slo_ms": args.slo_ms, "rates": {}}
    try:
        for rate in (float(r) for r in args.rates.split(",")):
            latencies, seconds = run_rate(args.url, rate, data, requests=args.requests)
            report["rates"][str(rate)] = slo_summary(latencies, args.slo_ms, seconds)
            print(f"rate {rate}/s: {json.dumps(report['rates'][str(rate)])}", flush=True)
    except HarnessError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
