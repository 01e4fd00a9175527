"""What patch-level batching changes: the same mixed-resolution requests served with whole-image
buckets and with patches (several halo sizes), in one process on the exported components.

    python perf/patch_quality.py --repo build/model_repository [--out perf/results/patch_quality.json]

Prints, per halo: max and mean absolute pixel difference and PSNR against whole-image execution, and
the UNet time of each scheme measured in the same run."""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from triffusion.orchestrator.engine import Engine, PipelineSpec
from triffusion.orchestrator.executor import RuntimeExecutor
from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.patches import PatchGrid
from triffusion.orchestrator.request import RequestState
from triffusion.orchestrator.scheduler import StepScheduler
from triffusion.orchestrator.text import PromptTokenizer
from triffusion.runtime import create_runtime


class Collect:
    def __init__(self):
        self.image = None

    def progress(self, step, steps): ...
    def finish(self, image, metadata): self.image = image
    def fail(self, status, message): raise RuntimeError(message)
    def is_cancelled(self): return False


class TimedExecutor(RuntimeExecutor):
    unet_s = 0.0

    def denoise(self, *args):
        start = time.perf_counter()
        out = super().denoise(*args)
        self.unet_s += time.perf_counter() - start
        return out


def serve(repo: Path, hybrid: str, grid: PatchGrid, jobs) -> tuple[list[np.ndarray], float]:
    pipeline = json.loads((repo / "orchestrator/1/pipeline.json").read_text())
    runtime = lambda name: create_runtime("onnxruntime", repo / pipeline["artifacts"][name])
    executor = TimedExecutor(runtime("text_encoder"), {"unet": runtime("unet")}, runtime("vae_decoder"))
    spec = PipelineSpec(model=pipeline["model"], scheduler_config=pipeline["scheduler_config"],
                        vae_scale_factor=pipeline["vae_scale_factor"], vae_scaling_factor=pipeline["vae_scaling_factor"])
    engine = Engine(executor, spec, StepScheduler(max_active=len(jobs), hybrid=hybrid, patch_grid=grid,
                                                  latent_scale=spec.vae_scale_factor), pipelined=False)
    tokenizer = PromptTokenizer(repo / "orchestrator/1/tokenizer")
    sinks = []
    for i, params in enumerate(jobs):
        sink = Collect()
        sinks.append(sink)
        engine.submit(RequestState(f"q{i}", params, sink, tokenizer.input_ids(params.prompt, "", params.uses_cfg)))
    while engine.scheduler.has_work:
        engine.step()
    return [s.image for s in sinks], executor.unet_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository")
    ap.add_argument("--patch", type=int, default=8, help="latent pixels per patch side")
    ap.add_argument("--halos", default="0,2,4,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    repo = Path(args.repo)
    sizes = [(64, 64), (128, 128), (128, 64), (256, 256), (192, 128), (64, 256)]
    jobs = [GenerationParams(prompt=f"a harbour at dawn, view {i}", height=h, width=w, steps=args.steps, seed=i)
            for i, (h, w) in enumerate(sizes)]
    base_grid = PatchGrid(args.patch, 0)
    whole, whole_s = serve(repo, "bucket", base_grid, jobs)
    report = {"bench": "patch_quality", "device": platform.machine(), "patch_latent": args.patch, "steps": args.steps,
              "sizes": sizes, "bucket_unet_s": round(whole_s, 3), "halos": {}}
    print(f"whole-image buckets: UNet {whole_s:.2f} s")
    for halo in (int(h) for h in args.halos.split(",")):
        patched, patched_s = serve(repo, "patch", PatchGrid(args.patch, halo), jobs)
        diffs = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(whole, patched)]
        mse = float(np.mean([np.mean(d ** 2) for d in diffs]))
        row = {"max_abs": int(max(d.max() for d in diffs)), "mean_abs": round(float(np.mean([d.mean() for d in diffs])), 3),
               "psnr_db": round(10 * math.log10(255 ** 2 / mse), 2) if mse else math.inf,
               "unet_s": round(patched_s, 3), "time_ratio_vs_bucket": round(patched_s / whole_s, 3)}
        report["halos"][str(halo)] = row
        print(f"patch {args.patch} halo {halo}: max |diff| {row['max_abs']}, mean {row['mean_abs']}, "
              f"PSNR {row['psnr_db']} dB, UNet {patched_s:.2f} s ({row['time_ratio_vs_bucket']}x of buckets)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
