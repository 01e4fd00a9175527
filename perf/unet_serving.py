"""UNet step latency through the real server against the same UNet in process, side by side in one run.

The candidate is what a GPU host serves: `--runtime torch` components (fp16, SDPA, CUDA graphs per
bucket) and the orchestrator running the UNet in process with device-resident request state. The
reference is the same exported UNet loaded here with the same CUDA graphs and timed alone.

    server_step_ms[b]       one denoising step of requests sharing a UNet call of b rows (b/2 requests with
                            classifier-free guidance), from the responses' own timings: denoise ms / steps
    server_unet_call_ms[b]  the UNet call alone inside the server at b rows (/metrics, unet_call_seconds)
    inprocess_step_ms[b]    the UNet call at b rows timed in this process (CUDA graph replay)
    e2e_50step_512_s        one request alone, end to end at the client (text, steps, decode, transport)

GPU host (SD1.5 architecture, random weights):
    python -m perf.unet_serving --preset sd15 --device cuda --size 512 --rows 2,8,16 --steps 50 \
        --out perf/results/unet_serving_h100.json
CPU smoke (tiny preset):
    python -m perf.unet_serving --preset tiny --size 64 --rows 2,4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from perf import metrics_text
from perf.cli import device_name
from triffusion import contract
from triffusion.client import generate
from triffusion.export.build import build
from triffusion.runtime import load_torch_runtime
from triffusion.server import TritonServer, free_port


def inprocess_step_ms(artifact: Path, device: str, size_latent: int, rows: list[int], repeats: int) -> dict:
    """The exported UNet with CUDA graphs for exactly these buckets, fed device tensors: the reference."""
    import torch

    runtime = load_torch_runtime(artifact, device=device, graph_shapes=[(r, size_latent, size_latent) for r in rows])
    config = runtime.module.unet.config
    hidden, channels = config.cross_attention_dim, config.in_channels
    result = {}
    for r in rows:
        inputs = {"sample": torch.randn(r, channels, size_latent, size_latent, device=device),
                  "timestep": torch.full((r,), 500.0, device=device),
                  "encoder_hidden_states": torch.randn(r, contract.TEXT_MAX_LENGTH, hidden, device=device)}
        runtime.run(inputs)  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.run(inputs)  # returns once the GPU is done
            times.append(time.perf_counter() - start)
        result[str(r)] = round(1000 * statistics.median(times), 3)
    del runtime
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def server_step_ms(url: str, metrics_url: str, size: int, rows: list[int], steps: int) -> tuple[dict, dict]:
    """b/2 requests at once per batch size b, after a warm-up round; per-step time from their timings."""
    per_step, per_call = {}, {}
    run = lambda i: generate(f"a lighthouse, take {i}", url=url, height=size, width=size, steps=steps, seed=i)
    with ThreadPoolExecutor(max(1, max(rows) // 2)) as pool:
        for r in rows + rows:  # warm every shape twice first: first calls in a fresh process are slow
            list(pool.map(run, range(max(1, r // 2))))
    for r in rows:
        requests = max(1, r // 2)
        with ThreadPoolExecutor(requests) as pool:
            before = metrics_text.scrape(metrics_url)
            results = list(pool.map(run, range(requests)))
            after = metrics_text.scrape(metrics_url)
        per_step[str(r)] = round(statistics.median(res.metadata["timings_ms"]["denoise"] / res.metadata["steps_done"]
                                                   for res in results), 3)
        call = metrics_text.mean_between(before, after, "triffusion_unet_call_seconds", rows=str(r))
        per_call[str(r)] = round(1000 * call, 3) if call is not None else None
    return per_step, per_call


def end_to_end_s(url: str, size: int, steps: int, repeats: int = 3) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        generate("a lighthouse on a cliff at dusk", url=url, height=size, width=size, steps=steps, seed=100 + i)
        times.append(time.perf_counter() - start)
    return round(min(times), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rows", default="2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workdir", type=Path, help="where the repository is exported (default: a temp dir)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    repo = (args.workdir or Path(tempfile.mkdtemp())) / "model_repository"
    build(args.preset, None, repo, random_weights=True, runtime="torch", sizes=[args.size], max_unet_rows=max(rows),
          fp16=args.device.startswith("cuda"), device="cuda" if args.device.startswith("cuda") else "cpu",
          profile=True)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    latent = args.size // pipeline["vae_scale_factor"]
    reference = inprocess_step_ms(repo / pipeline["artifacts"][contract.UNET], args.device, latent, rows, args.repeats)
    print(f"in process: {reference}", flush=True)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    if not args.device.startswith("cuda"):  # the CPU smoke still runs the device-resident engine path
        from triffusion.export.repository import write_repository

        write_repository(repo, pipeline, runtime="torch", orchestrator={
            "unet_executor": "inprocess", "runtime": "torch", "device": "cpu", "max_active": 16})
    with TritonServer(repo, **ports) as server:
        server.wait_ready(timeout_s=900)
        url, metrics_url = server.urls["grpc"], f"http://localhost:{ports['metrics_port']}/metrics"
        step, call = server_step_ms(url, metrics_url, args.size, rows, args.steps)
        e2e = end_to_end_s(url, args.size, args.steps)
    ratio = {r: round(step[r] / reference[r], 3) for r in step}
    report = {"bench": "unet_serving", "device": device_name(args.device), "preset": args.preset,
              "random_weights": True, "size": args.size, "steps": args.steps, "runtime": "torch",
              "server_step_ms": step, "server_unet_call_ms": call, "inprocess_step_ms": reference,
              "server_over_inprocess": ratio, f"e2e_{args.steps}step_{args.size}_s": e2e,
              "date": time.strftime("%Y-%m-%d")}
    if args.steps == 50 and args.size == 512:
        report["e2e_50step_512_s"] = e2e
    print(json.dumps(report, indent=2))
    print("server/in-process per step: " + ", ".join(f"b{r} {ratio[r]:.2f}x" for r in ratio)
          + f"; end to end {e2e:.3f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
