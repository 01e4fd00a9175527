"""Quality next to latency per serving policy: the same prompts and seeds served under each policy
(fixed steps, step_mode=auto, a cascade, a light UNet...), then CLIP score, FID against reference
images, mean latency, steps actually run and the UNet that answered, side by side.

    python -m perf.quality --url localhost:8001 --prompts perf/workloads/prompts.txt --n 200 \
        --policies fixed_50,auto,cascade --clip openai/clip-vit-large-patch14 [--reference DIR] --out quality.json

Policies: `fixed_N` (N steps), `auto` / `auto_N` (step_mode=auto, at most --steps or N steps), `cascade` /
`cascade_N` (unet=cascade), or any request fields with `--policy NAME='{"steps": 30, "unet": "tiny-lite"}'`.

CLIP score is torchmetrics' definition, 100 * cos(image embedding, prompt embedding), clamped at 0 per
pair as in Hessel et al. (torchmetrics clamps the batch mean instead: the same figure whenever no pair is
negative, which trained CLIP models rarely give). It is computed here on a transformers CLIPModel because
torchmetrics' CLIPScore reads `get_image_features()` as a tensor, which transformers 5 no longer returns.
open_clip is not used: it imports torchvision, and PyPI's torchvision does not import beside the CPU torch
wheel the project pins (LAION's hub repos, e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K, carry
transformers-format weights beside open_clip's).

FID is torchmetrics' FrechetInceptionDistance. Its default InceptionV3 needs torch-fidelity (which
imports torchvision) and the pt_inception-2015-12-05 weights (fetched from GitHub on first use, or
--inception-weights PATH), so it runs on a host with a CUDA torch build; on a few hundred images FID is
biased upward, so compare policies only at the same n against the same reference set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from perf.cli import OneLineParser, write_json
from perf.workloads import PROMPTS_PATH, WorkloadError, load_prompts
from triffusion.orchestrator.clip import DEFAULT_CLIP, ClipError, ClipScorer

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class QualityError(RuntimeError):
    """A quality run cannot go on; the message names what is missing and how to supply it."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ------------------------------------------------------------------------------------------------- FID


def _nchw_batches(images: Sequence[np.ndarray], max_batch: int = 64):
    """(N, 3, H, W) uint8 tensors over runs of equal-sized images, in order."""
    for _, run in itertools.groupby(images, key=lambda image: image.shape):
        run = list(run)
        for start in range(0, len(run), max_batch):
            yield torch.from_numpy(np.stack(run[start:start + max_batch])).permute(0, 3, 1, 2).contiguous()


class FidReference:
    """FID against one reference set: its features are taken once and kept for every generated set.
    `feature` maps (N, 3, H, W) uint8 images to (N, D) features; None is torchmetrics' InceptionV3 (2048)."""

    def __init__(self, reference: Sequence[np.ndarray], feature: torch.nn.Module | None = None,
                 inception_weights: str | None = None, device: str = "cpu"):
        if len(reference) < 2:
            raise QualityError(f"FID needs at least 2 reference images, got {len(reference)}")
        self.device = device
        self.metric = _fid_metric(feature, inception_weights).to(device)
        for batch in _nchw_batches(reference):
            self.metric.update(batch.to(device), real=True)

    def __call__(self, generated: Sequence[np.ndarray]) -> float:
        if len(generated) < 2:
            raise QualityError(f"FID needs at least 2 generated images, got {len(generated)}")
        self.metric.reset()  # reset_real_features=False: only the generated side is cleared
        for batch in _nchw_batches(generated):
            self.metric.update(batch.to(self.device), real=False)
        return float(self.metric.compute())


def _fid_metric(feature: torch.nn.Module | None, inception_weights: str | None):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as exc:
        raise QualityError(f"FID needs torchmetrics ({_one_line(exc)}): pip install -e '.[quality]'") from None
    if feature is not None:
        return FrechetInceptionDistance(feature=feature, reset_real_features=False)
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=inception_weights)
    except (ImportError, OSError, RuntimeError) as exc:
        raise QualityError(f"FID's InceptionV3 cannot be loaded ({_one_line(exc)}); it needs torch-fidelity "
                           "(pip install torch-fidelity==0.4.0, with a torchvision that imports beside torch) and "
                           "its pt_inception-2015-12-05 weights, fetched from GitHub on first use or given with "
                           "--inception-weights PATH") from None


def fid(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], feature: torch.nn.Module | None = None,
        inception_weights: str | None = None, device: str = "cpu") -> float:
    """Frechet distance between the feature statistics of two sets of HxWx3 uint8 images."""
    return FidReference(real, feature, inception_weights, device)(generated)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(results_by_policy: dict[str, list[dict]], scorer,
             reference_images: Sequence[np.ndarray] | FidReference | None = None,
             feature: torch.nn.Module | None = None, inception_weights: str | None = None,
             device: str = "cpu") -> dict[str, dict]:
    """Per policy: CLIP score mean and population std, FID against the reference images (None without
    them or with fewer than 2 images), mean latency, mean steps run and the fraction answered per UNet.
    Records carry prompt, image (HxWx3 uint8), latency_ms, steps and unet. `scorer` is anything with
    ClipScorer's `score`; `reference_images` may be a FidReference already built from them."""
    reference = reference_images
    if reference is not None and not isinstance(reference, FidReference):
        reference = FidReference(reference, feature, inception_weights, device)
    summary = {}
    for policy, records in results_by_policy.items():
        if not records:
            raise QualityError(f"policy {policy}: no records to evaluate")
        images = [r["image"] for r in records]
        clip = scorer.score(images, [r["prompt"] for r in records])
        unets = Counter(r["unet"] for r in records)
        summary[policy] = {
            "n": len(records),
            "clip_score_mean": float(np.mean(clip)),
            "clip_score_std": float(np.std(clip)),
            "fid": reference(images) if reference is not None and len(images) >= 2 else None,
            "latency_ms_mean": float(np.mean([r["latency_ms"] for r in records])),
            "steps_mean": float(np.mean([r["steps"] for r in records])),
            "unet_fraction": {unet: count / len(records) for unet, count in sorted(unets.items())},
        }
    return summary


# -------------------------------------------------------------------------------------- serving runs


def generate_with_server(url: str, prompts: Sequence[str], policy_inputs: dict[str, dict], *, seed: int = 0,
                         warmup: int = 1, timeout_s: float | None = 600.0, **fields: Any) -> dict[str, list[dict]]:
    """Serve every prompt once per policy over gRPC, one request at a time (latency is unloaded latency).
    Prompt i gets seed + i under every policy, and policies take turns per prompt so that drift in the
    server's state does not favour one of them; `warmup` untimed requests per policy go first.
    `fields` are request inputs common to all policies (height, width, guidance_scale...)."""
    from triffusion.client import GenerationError, generate

    def serve(policy: str, index: int, prompt: str):
        request = {"seed": seed + index, **fields, **policy_inputs[policy]}
        try:
            return generate(prompt, url=url, protocol="grpc", timeout_s=timeout_s, **request)
        except GenerationError as exc:
            raise QualityError(f"policy {policy}, prompt {index} ({prompt!r}): {_one_line(exc)}") from None

    for policy in policy_inputs:
        for _ in range(warmup):
            serve(policy, 0, prompts[0])
    results: dict[str, list[dict]] = {policy: [] for policy in policy_inputs}
    for index, prompt in enumerate(prompts):
        for policy in policy_inputs:
            start = time.perf_counter()
            result = serve(policy, index, prompt)
            latency_ms = (time.perf_counter() - start) * 1000.0
            results[policy].append({"prompt": prompt, "image": result.array, "latency_ms": latency_ms,
                                    "steps": result.metadata["steps_done"], "unet": result.metadata["unet"],
                                    "metadata": result.metadata})
    return results


def parse_policies(names: str, steps: int) -> dict[str, dict]:
    """Shorthand policy names -> request inputs: fixed_N, auto, auto_N, cascade, cascade_N."""
    policies = {}
    for name in filter(None, (n.strip() for n in names.split(","))):
        match = re.fullmatch(r"(fixed|auto|cascade)(?:_(\d+))?", name)
        if not match or (match[1] == "fixed" and not match[2]):
            raise QualityError(f"policy '{name}' is unknown; use fixed_N, auto, auto_N, cascade, cascade_N, "
                               "or --policy NAME=JSON")
        kind, count = match[1], match[2]
        inputs = {"steps": int(count) if count else steps}
        inputs.update({"auto": {"step_mode": "auto"}, "cascade": {"unet": "cascade"}}.get(kind, {}))
        policies[name] = inputs
    return policies


def parse_policy_json(spec: str) -> tuple[str, dict]:
    """NAME={"field": value, ...} -> (NAME, inputs)."""
    name, sep, body = spec.partition("=")
    try:
        inputs = json.loads(body) if sep and name else None
    except json.JSONDecodeError as exc:
        raise QualityError(f"--policy {spec}: {exc.msg} at column {exc.colno + len(name) + 1}") from None
    if not isinstance(inputs, dict):
        raise QualityError(f"--policy {spec}: expected NAME={{\"field\": value, ...}}")
    return name, inputs


def load_reference(directory: str | Path) -> list[np.ndarray]:
    """Reference images (png, jpg, webp) of a folder as HxWx3 uint8 arrays, in name order."""
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise QualityError(f"--reference {directory}: not a directory")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in REFERENCE_SUFFIXES)
    if len(paths) < 2:
        raise QualityError(f"--reference {directory}: {len(paths)} images ({', '.join(REFERENCE_SUFFIXES)}); "
                           "FID needs at least 2")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except OSError as exc:
            raise QualityError(f"{path}: cannot read image ({_one_line(exc)})") from None
    return images


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m perf.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    ap.add_argument("--prompts", default=str(PROMPTS_PATH), help="one prompt per line")
    ap.add_argument("--n", type=int, default=200, help="images per policy (the prompts repeat, with new seeds)")
    ap.add_argument("--policies", default="fixed_50,auto", help="fixed_N, auto, auto_N, cascade, cascade_N")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=JSON",
                    help='a policy by its request fields, e.g. lite=\'{"steps": 30, "unet": "tiny-lite"}\'')
    ap.add_argument("--steps", type=int, default=50, help="steps of the auto and cascade shorthands")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--guidance-scale", type=float)
    ap.add_argument("--seed", type=int, default=0, help="prompt i gets seed + i under every policy")
    ap.add_argument("--clip", default=DEFAULT_CLIP, help="transformers CLIP: hub id or local folder")
    ap.add_argument("--reference", help="folder of reference images for FID")
    ap.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights for FID")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for CLIP and FID")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    ap.add_argument("--out", help="JSON results")
    return ap


def _table(summary: dict[str, dict]) -> str:
    rows = [("policy", "n", "CLIP score", "FID", "latency ms", "steps", "unet")]
    for policy, s in summary.items():
        rows.append((policy, str(s["n"]), f"{s['clip_score_mean']:.2f} ± {s['clip_score_std']:.2f}",
                     "-" if s["fid"] is None else f"{s['fid']:.2f}", f"{s['latency_ms_mean']:.1f}",
                     f"{s['steps_mean']:.1f}",
                     ", ".join(f"{u} {f:.0%}" for u, f in s["unet_fraction"].items())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run(args) -> dict:
    # 1. Everything that can fail without the server fails before an hour of generation.
    if args.n < 1:
        raise QualityError(f"--n {args.n}: expected at least 1")
    policies = parse_policies(args.policies, args.steps)
    policies.update(parse_policy_json(spec) for spec in args.policy)
    if not policies:
        raise QualityError("no policies; pass --policies or --policy")
    prompts = list(itertools.islice(itertools.cycle(load_prompts(args.prompts)), args.n))
    reference = load_reference(args.reference) if args.reference else None
    try:
        scorer = ClipScorer.pretrained(args.clip, device=args.device)
    except ClipError as exc:
        raise QualityError(f"--clip: {exc}") from None
    fid_reference = (FidReference(reference, inception_weights=args.inception_weights, device=args.device)
                     if reference is not None else None)
    # 2. Serve, then score.
    fields = {"height": args.height, "width": args.width, "guidance_scale": args.guidance_scale}
    results = generate_with_server(args.url, prompts, policies, seed=args.seed, timeout_s=args.timeout_s,
                                   **{k: v for k, v in fields.items() if v is not None})
    summary = evaluate(results, scorer, reference_images=fid_reference)
    return {"url": args.url, "host": platform.node(), "clip": scorer.name,
            "fid_feature": "inception-v3-2048" if reference is not None else None, "reference": args.reference,
            "n": args.n, "seed": args.seed, "fields": fields,
            "policies": {p: {"inputs": policies[p], **s} for p, s in summary.items()}}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except (QualityError, WorkloadError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(_table(report["policies"]))
    if args.out and not write_json(args.out, report):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
