"""Cold start to ready, and median end-to-end time per image at 64x64 and 256x256, on the tiny preset.

    python perf/tiny_latency.py --repo build/model_repository [--runs 10] [--out perf/results/tiny_latency.json]

Starts its own server on free ports; requests go one at a time over gRPC (unary text_to_image)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from triffusion.client import generate
from triffusion.server import TritonServer, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    server = TritonServer(args.repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with server:
        ready_s = server.wait_ready(300)
        report = {"bench": "tiny_latency", "device": platform.processor() or platform.machine(),
                  "cpus": __import__("os").cpu_count(), "steps": args.steps, "cold_start_to_ready_s": round(ready_s, 2),
                  "median_s": {}, "server_total_ms_median": {}}
        for size in (64, 256):
            generate("warm up", height=size, width=size, steps=2, seed=0, url=server.urls["grpc"])
            walls, totals = [], []
            for i in range(args.runs):
                start = time.perf_counter()
                result = generate(f"a red bicycle, take {i}", height=size, width=size, steps=args.steps, seed=i,
                                  url=server.urls["grpc"])
                walls.append(time.perf_counter() - start)
                totals.append(result.metadata["timings_ms"]["total"])
            report["median_s"][str(size)] = round(statistics.median(walls), 4)
            report["server_total_ms_median"][str(size)] = round(statistics.median(totals), 1)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
