"""python -m triffusion.export build (--preset NAME | --model PATH) --out DIR [--seed N] [--force]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m triffusion.export")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export a pipeline into a Triton model repository")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="architecture preset built with seeded random weights (e.g. tiny)")
    src.add_argument("--model", help="local diffusers folder, or a hub id on a machine that reaches the hub")
    b.add_argument("--out", required=True, type=Path, help="model repository to write")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    b.add_argument("--fp16", action="store_true", help="export fp16 graphs (for GPU runtimes)")
    b.add_argument("--vocab", help="path to CLIP's bpe_simple_vocab_16e6.txt.gz")
    b.add_argument("--save-pipeline", type=Path, help="where to write the preset as a diffusers folder")
    b.add_argument("--no-profile", action="store_true", help="skip the latency profile that seeds admission")
    b.add_argument("--unet-variant", action="append", default=[], metavar="PRESET",
                   help="serve another UNet beside the base one as model unet_<preset> (repeatable)")
    b.add_argument("--target", choices=("embedded", "ngc"), default="embedded",
                   help="embedded: python-backend components; ngc: TensorRT engines for the tensorrt backend")
    b.add_argument("--sizes", default="", help="ngc: served image sizes, e.g. 512,768 (one engine profile each)")
    b.add_argument("--max-unet-rows", type=int, default=16, help="ngc: largest UNet batch an engine accepts")
    b.add_argument("--plan-only", action="store_true", help="ngc: write configs and the profile plan, build no engine")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the served components run (cuda: onnxruntime-gpu's CUDA provider)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .build import build

    try:
        build(args.preset, args.model, args.out, seed=args.seed, force=args.force, save_pipeline_to=args.save_pipeline,
              vocab=args.vocab, fp16=args.fp16, profile=not args.no_profile,
              device=args.device, target=args.target, max_unet_rows=args.max_unet_rows, plan_only=args.plan_only,
              sizes=[int(x) for x in args.sizes.split(",") if x] or None, unet_variants=tuple(args.unet_variant))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
