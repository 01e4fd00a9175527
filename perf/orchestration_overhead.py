"""Orchestration overhead through the real server: the same burst of concurrent requests with the UNet
as its own Triton model (one BLS round trip per step) and with the UNet in the orchestrator process.

    python perf/orchestration_overhead.py --repo build/model_repository [--out FILE]

BLS overhead = time the engine spent in UNet calls (triffusion_stage_seconds{stage="unet"}) minus the
unet model's own compute (Triton statistics), over that compute. Throughput of both modes is printed
side by side.

Rows per UNet call are measured, not assumed: rows_per_call_measured is the mean of
triffusion_unet_batch_rows over the measured burst (delta of its _sum over the delta of its _count) and
calls_by_rows counts the burst's UNet calls per row count (the rows labels of triffusion_unet_call_seconds).
rows_per_call_intended (2 x jobs: every request with classifier-free guidance in one call) is what the run
aimed at; when the two differ the row says so in rows_note (requests arrive and finish a few steps apart)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from triffusion.client import generate
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port

if not __package__:  # run as `python perf/orchestration_overhead.py`: the repository root holds perf/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perf import metrics_text  # noqa: E402


def unet_compute_s(http: str) -> float:
    stats = json.loads(urllib.request.urlopen(f"http://{http}/v2/models/unet/stats").read())
    s = stats["model_stats"][0]["inference_stats"]
    return sum(int(s[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")) / 1e9


def rows_fields(before: dict, after: dict, intended: int) -> dict:
    """Rows per UNet call over a burst, from two /metrics scrapes, beside the rows the burst aimed at."""
    rows = metrics_text.unet_rows_between(before, after)
    measured = rows["rows_per_call"]
    fields = {"rows_per_call_measured": measured, "rows_per_call_intended": intended,
              "calls_by_rows": rows["calls_by_rows"]}
    if measured is None:
        fields["rows_note"] = "no UNet call was observed in /metrics during the burst"
    elif abs(measured - intended) >= 0.005:
        full = rows["calls_by_rows"].get(str(intended), 0)
        fields["rows_note"] = (f"measured {measured} rows per call, not the intended {intended}: {full} of "
                               f"{rows['unet_calls']} UNet calls carried {intended} rows")
    return fields


def run_mode(repo: Path, mode: str, jobs: int, size: int, steps: int) -> dict:
    scratch = Path(tempfile.mkdtemp())
    try:
        return _run_mode(repo, scratch / "repo", mode, jobs, size, steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_mode(repo: Path, work: Path, mode: str, jobs: int, size: int, steps: int) -> dict:
    shutil.copytree(repo, work)
    pipeline = json.loads((work / "orchestrator/1/pipeline.json").read_text())
    write_repository(work, pipeline, orchestrator={"unet_executor": mode, "max_active": jobs, "max_batch": 2 * jobs})
    server = TritonServer(work, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    one = lambda i, url: generate(f"overhead {i}", height=size, width=size, steps=steps, seed=i, url=url,
                                  connect_timeout_s=None)
    with server:
        server.wait_ready(300)
        urls = server.urls

        def burst():
            with ThreadPoolExecutor(jobs) as pool:
                return list(pool.map(lambda i: one(i, urls["grpc"]), range(jobs)))

        burst()  # warm-up
        before, compute_before = metrics_text.scrape(urls["metrics"]), unet_compute_s(urls["http"])
        start = time.perf_counter()
        results = burst()
        wall = time.perf_counter() - start
        after, compute_after = metrics_text.scrape(urls["metrics"]), unet_compute_s(urls["http"])
    unet_s = metrics_text.delta(before, after, "triffusion_stage_seconds_sum", stage="unet")
    calls = metrics_text.delta(before, after, "triffusion_stage_seconds_count", stage="unet")
    row = {"images_per_s": round(jobs / wall, 3), "wall_s": round(wall, 3), "unet_calls": int(calls),
           "engine_unet_s": round(unet_s, 4), **rows_fields(before, after, 2 * jobs),
           "steps_done": sum(r.metadata["steps_done"] for r in results)}
    if mode == "bls":
        compute = compute_after - compute_before
        row["unet_model_compute_s"] = round(compute, 4)
        row["bls_overhead_pct"] = round(100 * (unet_s - compute) / compute, 2) if compute > 0 else None
        row["bls_overhead_ms_per_call"] = round(1000 * (unet_s - compute) / max(calls, 1), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository")
    ap.add_argument("--jobs", type=int, default=4,
                    help="concurrent requests (UNet rows per call intended: 2 x jobs; measured ones are reported)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    report = {"bench": "orchestration_overhead", "device": platform.machine(), "jobs": args.jobs, "size": args.size,
              "steps": args.steps, "modes": {}}
    for mode in ("bls", "inprocess"):
        report["modes"][mode] = run_mode(Path(args.repo), mode, args.jobs, args.size, args.steps)
        print(mode, json.dumps(report["modes"][mode]), flush=True)
    bls, inproc = report["modes"]["bls"], report["modes"]["inprocess"]
    report["orchestration_overhead_pct"] = bls["bls_overhead_pct"]
    print(f"BLS per-step UNet calls cost {bls['bls_overhead_pct']}% over the UNet's compute "
          f"({bls['bls_overhead_ms_per_call']} ms per call at {bls['rows_per_call_measured']} rows per call, "
          f"measured); in-process UNet: {inproc['images_per_s'] / bls['images_per_s']:.2f}x the throughput "
          f"at {inproc['rows_per_call_measured']} rows per call")
    for mode, row in report["modes"].items():
        if "rows_note" in row:
            print(f"{mode}: {row['rows_note']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
