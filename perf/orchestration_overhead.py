"""Orchestration overhead through the real server: the same burst of concurrent requests with the UNet
as its own Triton model (one BLS round trip per step) and with the UNet in the orchestrator process.

    python perf/orchestration_overhead.py --repo build/model_repository [--out FILE]

BLS overhead = time the engine spent in UNet calls (triffusion_stage_seconds{stage="unet"}) minus the
unet model's own compute (Triton statistics), over that compute. Throughput of both modes is printed
side by side."""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from triffusion.client import generate
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port


def metric_sum(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}{{{labels}}} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def unet_compute_s(http: str) -> float:
    stats = json.loads(urllib.request.urlopen(f"http://{http}/v2/models/unet/stats").read())
    s = stats["model_stats"][0]["inference_stats"]
    return sum(int(s[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")) / 1e9


def run_mode(repo: Path, mode: str, jobs: int, size: int, steps: int) -> dict:
    work = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(repo, work)
    pipeline = json.loads((work / "orchestrator/1/pipeline.json").read_text())
    write_repository(work, pipeline, orchestrator={"unet_executor": mode, "max_active": jobs, "max_batch": 2 * jobs})
    server = TritonServer(work, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with server:
        server.wait_ready(300)
        urls = server.urls
        burst = lambda: list(ThreadPoolExecutor(jobs).map(
            lambda i: generate(f"overhead {i}", height=size, width=size, steps=steps, seed=i, url=urls["grpc"]),
            range(jobs)))
        burst()  # warm-up
        read = lambda: urllib.request.urlopen(urls["metrics"]).read().decode()
        before, compute_before = read(), unet_compute_s(urls["http"])
        start = time.perf_counter()
        results = burst()
        wall = time.perf_counter() - start
        after, compute_after = read(), unet_compute_s(urls["http"])
    unet_s = (metric_sum(after, "triffusion_stage_seconds_sum", 'stage="unet"')
              - metric_sum(before, "triffusion_stage_seconds_sum", 'stage="unet"'))
    calls = (metric_sum(after, "triffusion_stage_seconds_count", 'stage="unet"')
             - metric_sum(before, "triffusion_stage_seconds_count", 'stage="unet"'))
    row = {"images_per_s": round(jobs / wall, 3), "wall_s": round(wall, 3), "unet_calls": int(calls),
           "engine_unet_s": round(unet_s, 4), "rows_per_call": 2 * jobs,
           "steps_done": sum(r.metadata["steps_done"] for r in results)}
    if mode == "bls":
        compute = compute_after - compute_before
        row["unet_model_compute_s"] = round(compute, 4)
        row["bls_overhead_pct"] = round(100 * (unet_s - compute) / compute, 2)
        row["bls_overhead_ms_per_call"] = round(1000 * (unet_s - compute) / max(calls, 1), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository")
    ap.add_argument("--jobs", type=int, default=4, help="concurrent requests (UNet rows per call = 2 x jobs)")
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
          f"({bls['bls_overhead_ms_per_call']} ms per call); in-process UNet: "
          f"{inproc['images_per_s'] / bls['images_per_s']:.2f}x the throughput")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
