"""python -m triffusion.export build (--preset NAME [--random-weights] | --model PATH | --registry F --family N)
--out DIR [--seed N] [--force]
python -m triffusion.export add-lora --repo DIR --name NAME --file ADAPTER.safetensors
python -m triffusion.export make-lora --repo DIR --out ADAPTER.safetensors [--rank R] [--format diffusers|kohya]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m triffusion.export")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export a pipeline into a Triton model repository")
    b.add_argument("--preset", help="architecture preset (export/configs/<preset>); its real weights come from its "
                   "hub checkpoint or --model, or seeded random ones with --random-weights")
    b.add_argument("--model", help="local diffusers folder, or a hub id on a machine that reaches the hub")
    b.add_argument("--random-weights", action="store_true",
                   help="the architecture with seeded random weights (same FLOPs and shapes; for speed runs)")
    b.add_argument("--registry", type=Path, help="model registry YAML (with --family): the family's variants")
    b.add_argument("--family", help="with --registry: which family to export")
    b.add_argument("--out", required=True, type=Path, help="model repository to write")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    b.add_argument("--fp16", action="store_true", help="embedded: fp16 graphs and weights (for GPU runtimes); "
                   "ngc: FP32 ONNX either way, the engines run fp16 inside")
    b.add_argument("--vocab", help="path to CLIP's bpe_simple_vocab_16e6.txt.gz")
    b.add_argument("--save-pipeline", type=Path, help="where to write the preset as a diffusers folder")
    b.add_argument("--no-profile", action="store_true", help="skip the latency profile that seeds admission")
    b.add_argument("--unet-variant", action="append", default=[], metavar="PRESET",
                   help="serve another UNet beside the base one as model unet_<preset> (repeatable)")
    b.add_argument("--cascade", metavar="PRESET", help="serve unet=cascade: this --unet-variant answers first, "
                   "the quality gate sends low scores to the default UNet")
    b.add_argument("--cascade-threshold", type=float, default=0.5, help="gate score below which a query escalates")
    b.add_argument("--gate", help="trained discriminator weights (python -m triffusion.orchestrator.gate train), "
                   "or clip:FOLDER / clip:HUB_ID to gate on CLIP score (clip:random: a tiny seeded CLIP); "
                   "default: a discriminator with seeded random weights")
    b.add_argument("--baselines", action="store_true", help="also serve baseline_sequential (plain diffusers loop) "
                   "and baseline_batching (whole-request dynamic batching) for benchmarks")
    b.add_argument("--target", choices=("embedded", "ngc"), default="embedded",
                   help="embedded: python-backend components; ngc: TensorRT engines for the tensorrt backend")
    b.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="embedded: what runs each component (torch: fp16, SDPA, CUDA graphs per served bucket)")
    b.add_argument("--sizes", default="", help="served image sizes, e.g. 512,768: ngc builds an engine profile "
                   "each, --runtime torch captures CUDA graphs for each")
    b.add_argument("--max-unet-rows", type=int, default=16, help="largest UNet batch an engine or graph covers")
    b.add_argument("--plan-only", action="store_true", help="ngc: write the profile plan and build no engine; the "
                   "components are served as python models (onnxruntime on --device) until the engines are built")
    b.add_argument("--controlnet", action="append", default=[], metavar="NAME=PRESET",
                   help="serve a ControlNet that requests name as NAME: a ControlNet preset (e.g. tiny-controlnet, "
                   "sd15-controlnet) or a local ControlNetModel folder (repeatable; a registry family's controlnets)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the served components run (cuda: onnxruntime-gpu's CUDA provider)")
    a = sub.add_parser("add-lora", help="register a LoRA adapter (safetensors: diffusers/PEFT or kohya) in a built "
                       "repository, without rebuilding")
    a.add_argument("--repo", required=True, type=Path, help="the built model repository")
    a.add_argument("--name", required=True, help="the name requests give in `lora` (NAME:SCALE)")
    a.add_argument("--file", required=True, type=Path, help="the adapter, a .safetensors file")
    a.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    m = sub.add_parser("make-lora", help="write a seeded LoRA adapter for a repository's UNet (an example file)")
    m.add_argument("--repo", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    m.add_argument("--rank", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    m.add_argument("--std", type=float, default=0.05, help="standard deviation of the random A and B weights")
    return p


def _lora_command(args) -> int:
    from .lora import add_lora, make_lora

    try:
        if args.command == "add-lora":
            add_lora(args.repo, args.name, args.file, force=args.force)
        else:
            make_lora(args.repo, args.out, rank=args.rank, seed=args.seed, fmt=args.format, std=args.std)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


def from_registry(path: Path, family: str | None):
    """(preset, model, light variants, registry section) for one family of a registry file."""
    from triffusion.orchestrator.registry import load_registry

    from .presets import presets

    registry = load_registry(path, set(presets()))
    if family not in registry.families:
        raise SystemExit(f"--family {family}: not in {path}; families: {', '.join(registry.families)}")
    fam = registry.families[family]
    base = fam.variants[fam.default]
    others = [v for name, v in fam.variants.items() if name != fam.default]
    if any(v.model for v in others):
        raise SystemExit(f"{path}: families.{family}: extra variants must be presets for now (checkpoint "
                         "variants are not exported yet)")
    cascade = None
    if fam.cascade:
        if fam.cascade["heavy"] != fam.default:
            raise SystemExit(f"{path}: families.{family}.cascade.heavy must be the family's default variant "
                             f"('{fam.default}'): the default UNet is the heavy model")
        light = fam.variants[fam.cascade["light"]]
        if not light.preset:
            raise SystemExit(f"{path}: families.{family}.cascade.light must be a preset variant for now")
        cascade = {"light": light.preset, "threshold": fam.cascade["threshold"],
                   "options": fam.cascade.get("options", []), "gate": fam.cascade.get("gate")}
    section = {"family": family, "default": fam.default, "variants": {n: v.preset or v.model for n, v in fam.variants.items()},
               "cascade": fam.cascade, "styles": list(fam.styles), "entropy": fam.entropy,
               "slo_classes": registry.slo_classes}
    if fam.controlnets:
        section["controlnets"] = dict(fam.controlnets)
    if fam.lora:  # adapter files are relative to the registry file
        adapters = {name: str((Path(path).parent / file).resolve()) for name, file in fam.lora.get("adapters", {}).items()}
        section["lora"] = {**fam.lora, "adapters": adapters}
    return base.preset, base.model, tuple(v.preset for v in others), section, cascade


def _name_value(item: str, flag: str) -> tuple[str, str]:
    from triffusion.orchestrator.registry import CONTROLNET_NAME

    name, _, value = item.partition("=")
    if not CONTROLNET_NAME.match(name) or not value:
        raise ValueError(f"{flag} {item}: expected NAME=PRESET with NAME 1..32 of a-z, 0-9 and _")
    return name, value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("add-lora", "make-lora"):
        return _lora_command(args)
    from .build import build

    if args.registry and (args.preset or args.model):
        raise SystemExit("error: --registry chooses the models itself; drop --preset/--model")
    if not (args.registry or args.preset or args.model):
        raise SystemExit("error: pass --preset NAME, --model PATH, or --registry FILE --family NAME")
    try:
        preset, model, variants, registry = args.preset, args.model, tuple(args.unet_variant), None
        cascade = {"light": args.cascade, "threshold": args.cascade_threshold} if args.cascade else None
        if not 0.0 <= args.cascade_threshold <= 1.0:
            raise ValueError(f"--cascade-threshold {args.cascade_threshold} is out of range; allowed 0..1")
        controlnets = dict(_name_value(item, "--controlnet") for item in args.controlnet)
        if args.registry:
            preset, model, variants, registry, cascade = from_registry(args.registry, args.family)
            controlnets = {**(registry.get("controlnets") or {}), **controlnets}
        build(preset, model, args.out, registry=registry, seed=args.seed, force=args.force, save_pipeline_to=args.save_pipeline,
              vocab=args.vocab, fp16=args.fp16, profile=not args.no_profile, random_weights=args.random_weights, runtime=args.runtime,
              cascade=cascade, gate=args.gate or (cascade or {}).get("gate"), baselines=args.baselines,
              device=args.device, target=args.target, max_unet_rows=args.max_unet_rows, plan_only=args.plan_only,
              sizes=[int(x) for x in args.sizes.split(",") if x] or None, unet_variants=variants,
              controlnets=controlnets or None)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RegistryError is a ValueError
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
