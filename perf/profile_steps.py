"""Profile quality and time against denoising steps for every served UNet, through the real server: the
step-quality curves the scheduler uses to pick steps for an SLO class's quality floor (pipeline.json
`step_quality`), measured here rather than typed in.

For each UNet variant and each step count in `--steps`, `--n` prompts (the CC0 prompt set, fixed seeds)
are generated through the `text_to_image` front with step_mode fixed and no SLO. Quality at s steps is
fidelity to the same prompt and seed at the largest step count (the reference):
PSNR(image_s, image_ref) / `--psnr-cap` dB, clipped to 0..1 (1 = the reference itself). It needs no
trained model, so it means the same on random weights; with real weights, `perf.quality` measures CLIP
score and FID per policy. Seconds at s steps: the server's time for one request alone (its metadata
timings: encode + denoise + decode), the median over the prompts.

    python -m perf.profile_steps --repo build/model_repository --steps 2,4,6,8,10,14,20 --n 8 --write
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from perf.cli import OneLineParser, write_json
from perf.workloads import load_prompts
from triffusion import contract


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def profile_variant(url: str, variant: str, steps: list[int], prompts: list[str], size: int, psnr_cap: float) -> dict:
    from triffusion.client import generate

    images: dict[int, list[np.ndarray]] = {}
    seconds: dict[int, list[float]] = {}
    for s in sorted(steps):
        images[s], seconds[s] = [], []
        for i, prompt in enumerate(prompts):
            result = generate(prompt, url=url, steps=s, seed=1000 + i, height=size, width=size, unet=variant,
                              connect_timeout_s=None)
            t = result.metadata["timings_ms"]
            seconds[s].append((t["encode"] + t["denoise"] + t["decode"]) / 1000.0)
            images[s].append(result.array)
    reference = images[max(steps)]
    quality = []
    for s in sorted(steps):
        fidelity = [min(psnr(img, ref), psnr_cap) / psnr_cap for img, ref in zip(images[s], reference)]
        quality.append(round(statistics.fmean(fidelity), 4))
    # Quality must not fall as steps grow: a later step count that scored lower keeps the earlier score
    # (noise between prompts, not a real loss), so the scheduler's floor lookup stays well defined.
    for i in range(1, len(quality)):
        quality[i] = max(quality[i], quality[i - 1])
    return {"steps": sorted(steps), "quality": quality,
            "seconds": [round(statistics.median(seconds[s]), 5) for s in sorted(steps)]}


def profile_auto_stop(url: str, variant: str, classes: dict, steps: int, prompts: list[str], size: int) -> dict:
    """Where the entropy stop ends step_mode=auto requests of each class with a quality floor, alone on the
    server (no SLO pressure): the mean fraction of the requested steps that ran."""
    from triffusion.client import generate

    out = {}
    for name, level in sorted(classes.items()):
        if level.get("min_quality") is None:
            continue
        done = [generate(prompt, url=url, steps=steps, seed=2000 + i, height=size, width=size, unet=variant,
                         step_mode="auto", slo_class=name, slo_ms=3_600_000,
                         connect_timeout_s=None).metadata["steps_done"] for i, prompt in enumerate(prompts)]
        out[name] = {"requested": steps, "steps_done_mean": round(statistics.fmean(done), 3),
                     "fraction": round(statistics.fmean(done) / steps, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.profile_steps", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a built model repository")
    ap.add_argument("--url", help="a running server's gRPC address serving --repo (else one is started)")
    ap.add_argument("--steps", default="2,4,6,8,10,14,20")
    ap.add_argument("--n", type=int, default=8, help="prompts per step count")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--psnr-cap", type=float, default=40.0, help="PSNR (dB) counted as quality 1")
    ap.add_argument("--auto-steps", type=int, default=20,
                    help="requested steps for the entropy-stop profile of each SLO class with a quality floor "
                         "(needs --write, or --url of a server that already holds step_quality; 0: skip it)")
    ap.add_argument("--out", help="write the profiles here as JSON")
    ap.add_argument("--write", action="store_true", help="and into the repository's pipeline.json (step_quality)")
    args = ap.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s})
    except ValueError:
        ap.error(f"--steps: {args.steps!r} is not a list of integers")
    if len(steps) < 2 or steps[0] < 1:
        ap.error("--steps: give at least two step counts >= 1")
    repo = Path(args.repo)
    pipeline_path = repo / contract.ORCHESTRATOR / "1" / "pipeline.json"
    if not pipeline_path.exists():
        print(f"error: {repo}: no orchestrator/1/pipeline.json; build one with python -m triffusion.export build",
              file=sys.stderr)
        return 2
    pipeline = json.loads(pipeline_path.read_text())
    variants = dict(pipeline.get("unets", {"default": contract.UNET}))  # request name -> Triton model
    prompts = load_prompts()[: args.n]

    classes = pipeline.get("limits", {}).get("slo_classes") or {}
    floors = args.auto_steps and any(c.get("min_quality") is not None for c in classes.values())

    def curves(url: str) -> dict:
        return {model: profile_variant(url, name, steps, prompts, args.size, args.psnr_cap)
                for name, model in variants.items()}

    def auto_stops(url: str) -> dict:
        return {model: profile_auto_stop(url, name, classes, args.auto_steps, prompts, args.size)
                for name, model in variants.items()}

    stops: dict = {}
    if args.url:  # a running server: the entropy-stop profile needs it to hold step_quality already
        profiles = curves(args.url)
        if floors and pipeline.get("step_quality"):
            stops = auto_stops(args.url)
    else:
        from triffusion.server import TritonServer, free_port

        serve = lambda: TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with serve() as server:
            server.wait_ready(300)
            profiles = curves(server.urls["grpc"])
        if floors and args.write:  # the floors need the curves in pipeline.json: write them, serve again
            pipeline["step_quality"] = profiles
            pipeline_path.write_text(json.dumps(pipeline, indent=2, sort_keys=True) + "\n")
            with serve() as server:
                server.wait_ready(300)
                stops = auto_stops(server.urls["grpc"])
    report = {"bench": "profile_steps", "repo": str(repo), "size": args.size, "n": args.n,
              "psnr_cap_db": args.psnr_cap, "quality": "PSNR to the largest step count / cap, clipped to 1",
              "step_quality": profiles, "auto_stop": stops}
    print(json.dumps(profiles))
    if args.out and not write_json(args.out, report):
        return 2
    if args.write:
        pipeline["step_quality"] = profiles
        if stops:
            pipeline["auto_stop"] = stops
        pipeline_path.write_text(json.dumps(pipeline, indent=2, sort_keys=True) + "\n")
        # The export rewrites pipeline.json from its manifest when it finds the build up to date: keep them there.
        manifest_path = repo / "export_manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if isinstance(manifest.get("pipeline"), dict):
                manifest["pipeline"]["step_quality"] = profiles
                if stops:
                    manifest["pipeline"]["auto_stop"] = stops
                manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        print(f"wrote step_quality{' and auto_stop' if stops else ''} for {', '.join(profiles)} into {pipeline_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
