"""UNet step latency through the real server against the same UNet in process, side by side in one run.

The candidate is what a GPU host serves: `--runtime torch` components (fp16, SDPA, CUDA graphs per
bucket) and the orchestrator running the UNet in process with device-resident request state. The
reference is the same exported UNet loaded here with the same CUDA graphs and timed alone.

Each claimed row count b is driven by b/2 concurrent requests with classifier-free guidance (2 rows each),
through the streaming front by default (`--front unary`: the unary one), into an orchestrator configured with
max_active = max(rows)/2 and max_batch = max(rows). Whether the UNet calls really carried b rows is read
from /metrics, never assumed:

    rows_observed[b]        what the UNet calls of b's burst carried, from /metrics: calls per row count (the
                            rows labels of triffusion_unet_call_seconds), mean rows per call
                            (triffusion_unet_batch_rows), calls_at_rows (those with exactly b rows), reached
    server_unet_call_ms[b]  the UNet call alone inside the server, mean over the calls of exactly b rows
                            (triffusion_unet_call_seconds{rows="b"}); null when no call carried b rows
    server_step_ms[b]       one denoising step as b's requests saw it, from the responses' own timings:
                            denoise ms / steps (calls at other row counts of the burst included; see
                            rows_observed[b].full_call_fraction); null when no call carried b rows
    inprocess_step_ms[b]    the UNet call at b rows timed in this process (CUDA graph replay)
    e2e_<steps>step_<size>_s one request alone, end to end at the client (text, steps, decode, transport)

A row count that no UNet call carried is listed in rows_not_reached and gets no server figure (with
--strict the run then exits 1 after writing its report).

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
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from perf import metrics_text
from perf.cli import device_name
from triffusion import contract
from triffusion.client import generate, start_stream_generation
from triffusion.export.build import build
from triffusion.export.repository import write_repository
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


PROMPT = "a lighthouse, take {}"
GUIDANCE = 7.5  # > 1: classifier-free guidance, two UNet rows per request
RESULT_TIMEOUT_S = 900.0


def burst(url: str, front: str, size: int, steps: int, requests: int) -> list:
    """`requests` generations at once, each with classifier-free guidance; their results."""
    fields = dict(url=url, height=size, width=size, steps=steps, guidance_scale=GUIDANCE, connect_timeout_s=None)
    if front == "unary":
        with ThreadPoolExecutor(requests) as pool:
            return list(pool.map(lambda i: generate(PROMPT.format(i), seed=i, **fields), range(requests)))
    handles = []
    try:
        for i in range(requests):  # every stream opened before any result is awaited
            handles.append(start_stream_generation(PROMPT.format(i), seed=i, **fields))
        return [handle.result(RESULT_TIMEOUT_S) for handle in handles]
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise


def rows_observed(before: dict, after: dict, rows: int) -> dict:
    """What one burst's UNet calls carried, from two /metrics scrapes, against the row count it claims."""
    seen = metrics_text.unet_rows_between(before, after)
    at_rows = seen["calls_by_rows"].get(str(rows), 0)
    return {"calls_by_rows": seen["calls_by_rows"], "rows_per_call": seen["rows_per_call"],
            "unet_calls": seen["unet_calls"], "calls_at_rows": at_rows,
            "full_call_fraction": round(at_rows / seen["unet_calls"], 3) if seen["unet_calls"] else None,
            "reached": at_rows > 0}


def server_step_ms(url: str, metrics_url: str, size: int, rows: list[int], steps: int,
                   front: str = "stream") -> tuple[dict, dict, dict]:
    """b/2 concurrent requests per claimed row count b, after a warm-up round; per-step time from their
    timings, UNet call time at exactly b rows and the rows the calls carried from /metrics."""
    per_step, per_call, observed = {}, {}, {}
    for r in rows + rows:  # warm every shape twice first: first calls in a fresh process are slow
        burst(url, front, size, steps, r // 2)
    for r in rows:
        before = metrics_text.scrape(metrics_url)
        results = burst(url, front, size, steps, r // 2)
        after = metrics_text.scrape(metrics_url)
        seen = observed[str(r)] = rows_observed(before, after, r)
        seen["request_step_ms"] = round(statistics.median(
            res.metadata["timings_ms"]["denoise"] / res.metadata["steps_done"] for res in results), 3)
        call = metrics_text.mean_between(before, after, metrics_text.UNET_CALL_SECONDS, rows=str(r))
        per_step[str(r)] = seen["request_step_ms"] if seen["reached"] else None
        per_call[str(r)] = round(1000 * call, 3) if call is not None else None
    return per_step, per_call, observed


def end_to_end_s(url: str, size: int, steps: int, repeats: int = 3) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        generate("a lighthouse on a cliff at dusk", url=url, height=size, width=size, steps=steps, seed=100 + i,
                 guidance_scale=GUIDANCE, connect_timeout_s=None)
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
    ap.add_argument("--front", choices=("stream", "unary"), default="stream",
                    help="which front the concurrent requests call (stream: text_to_image_stream over gRPC)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a claimed row count was never reached")
    ap.add_argument("--workdir", type=Path, help="where the repository is exported (default: a temp dir)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    odd = [r for r in rows if r < 2 or r % 2]
    if odd:
        ap.error(f"--rows {args.rows}: {odd} cannot be reached; every request brings 2 UNet rows "
                 "(classifier-free guidance), so rows must be even and >= 2")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    repo = (args.workdir or Path(tempfile.mkdtemp())) / "model_repository"
    build(args.preset, None, repo, random_weights=True, runtime="torch", sizes=[args.size], max_unet_rows=max(rows),
          fp16=device == "cuda", device=device, profile=True)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    latent = args.size // pipeline["vae_scale_factor"]
    reference = inprocess_step_ms(repo / pipeline["artifacts"][contract.UNET], args.device, latent, rows, args.repeats)
    print(f"in process: {reference}", flush=True)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    # The device-resident engine path (the UNet in the orchestrator) on every device, with room for exactly the
    # largest claimed row count: max(rows)/2 requests in one UNet call of max(rows) rows.
    orchestrator = {"unet_executor": "inprocess", "runtime": "torch", "device": device,
                    "max_active": max(rows) // 2, "max_batch": max(rows)}
    write_repository(repo, pipeline, runtime="torch", device=device, orchestrator=orchestrator)
    with TritonServer(repo, **ports) as server:
        server.wait_ready(timeout_s=900)
        url, metrics_url = server.urls["grpc"], f"http://localhost:{ports['metrics_port']}/metrics"
        step, call, observed = server_step_ms(url, metrics_url, args.size, rows, args.steps, args.front)
        e2e = end_to_end_s(url, args.size, args.steps)
    missing = [r for r in rows if not observed[str(r)]["reached"]]
    ratio = {r: round(step[r] / reference[r], 3) if step[r] is not None else None for r in step}
    call_ratio = {r: round(call[r] / reference[r], 3) if call[r] is not None else None for r in call}
    report = {"bench": "unet_serving", "device": device_name(args.device), "preset": args.preset,
              "random_weights": True, "size": args.size, "steps": args.steps, "runtime": "torch",
              "front": args.front, "orchestrator": {k: orchestrator[k] for k in ("max_active", "max_batch")},
              "rows_claimed": rows, "rows_not_reached": missing, "rows_observed": observed,
              "server_step_ms": step, "server_unet_call_ms": call, "inprocess_step_ms": reference,
              "server_over_inprocess": ratio, "server_call_over_inprocess": call_ratio,
              f"e2e_{args.steps}step_{args.size}_s": e2e, "date": time.strftime("%Y-%m-%d")}
    if args.steps == 50 and args.size == 512:
        report["e2e_50step_512_s"] = e2e
    print(json.dumps(report, indent=2))
    fmt = lambda x: f"{x:.2f}x" if x is not None else "not reached"
    print("server/in-process per step: " + ", ".join(f"b{r} {fmt(ratio[r])}" for r in ratio)
          + "; UNet call alone: " + ", ".join(f"b{r} {fmt(call_ratio[r])}" for r in call_ratio)
          + f"; end to end {e2e:.3f} s")
    for r in rows:
        seen = observed[str(r)]
        print(f"b{r}: {seen['calls_at_rows']} of {seen['unet_calls']} UNet calls carried {r} rows "
              f"(calls by rows {seen['calls_by_rows']}, mean {seen['rows_per_call']})", flush=True)
    if missing:
        print(f"NOT REACHED: no UNet call carried {', '.join(map(str, missing))} rows; those row counts have no "
              "server figures", file=sys.stderr, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if missing and args.strict:
        sys.exit(1)


if __name__ == "__main__":
    main()
