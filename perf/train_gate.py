"""Train a built repository's cascade gate on its own models' answers, where no real photos exist.

    python -m perf.train_gate --repo build/model_repository --n 48 --steps 20 --write

DiffServe's gate is a discriminator trained on real images against the light model's; its threshold is
then picked by the fraction of queries to escalate. Where no photos exist (this project's CI: weights are
seeded, nothing downloads), the heavy model's answers stand in for "real": the gate learns how unlike
the heavy model's answer a light answer looks, and the cascade's options then trade escalations for that
score. With a seeded random gate every answer scores about the same, the heavy model's no better, and the
controller has nothing to trade (it keeps the cheapest option at every load).

It serves the repository (triffusion.server.TritonServer), sends --n prompts (perf/workloads/prompts.txt;
prompt i gets seed --seed + i, half of them at each of --sizes) through the `text_to_image` front over
unary gRPC, once on the cascade's light UNet and once on its heavy one, at --steps, and trains the
discriminator (triffusion.orchestrator.gate.train: heavy = real, light = generated) on all but every
fourth pair; the held-out quarter gives the accuracy it reports. --write saves the weights as the
repository's `quality_gate/1/gate.pt` (read by the quality_gate model at its next load) and marks the
gate trained in pipeline.json and in the export manifest's copy. Run perf.profile_cascade after it: the
options' escalations and qualities are the gate's.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from perf.cli import OneLineParser, write_json
from perf.profile_cascade import ProfileError, generate_all, read_pipeline, request_names, serving, update_pipeline
from perf.workloads import PROMPTS_PATH, WorkloadError, load_prompts
from triffusion import contract

GATE_REL = Path(contract.QUALITY_GATE) / "1" / "gate.pt"


def run(args) -> dict:
    from triffusion.orchestrator.gate import Gate, train

    repo = Path(args.repo)
    pipeline = read_pipeline(repo)
    gate = pipeline.get("gate") or {}
    if gate.get("kind") != "discriminator":
        raise ProfileError(f"{repo} serves a {gate.get('kind', 'missing')} gate; only a discriminator is trained")
    if args.n < 4:
        raise ProfileError(f"--n {args.n}: expected at least 4 (a quarter is held out)")
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise ProfileError(f"--sizes {args.sizes}: expected comma-separated image sides (e.g. 64,128)") from None
    if not sizes or min(sizes) < 8:
        raise ProfileError(f"--sizes {args.sizes}: expected image sides of 8 or more")
    light_name, heavy_name = request_names(pipeline)
    light_model, heavy_model = pipeline["cascade"]["light"], pipeline["cascade"]["heavy"]
    prompts = list(itertools.islice(itertools.cycle(load_prompts(args.prompts)), args.n))
    images = {"light": [], "heavy": []}
    with serving(repo, args.ready_timeout_s, log_file=args.server_log) as served:
        for k, size in enumerate(sizes):
            part = prompts[k::len(sizes)]
            seed = args.seed + k * args.n
            fields = {"height": size, "width": size}
            for role, unet, model in (("light", light_name, light_model), ("heavy", heavy_name, heavy_model)):
                got, _ = generate_all(served, part, seed, unet, args.steps, fields, args.timeout_s, model)
                images[role] += got
                print(f"{role} ({unet}) at {size}x{size}: {len(got)} images", file=sys.stderr, flush=True)
    held = [i for i in range(len(prompts)) if i % 4 == 3]
    fit = [i for i in range(len(prompts)) if i % 4 != 3]
    pick = lambda role, idx: [images[role][i] for i in idx]
    model = train(pick("heavy", fit), pick("light", fit), epochs=args.epochs, seed=args.seed,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    scorer = Gate(model)
    light_held, heavy_held = scorer.score(pick("light", held)), scorer.score(pick("heavy", held))
    accuracy = float(((heavy_held >= 0.5).sum() + (light_held < 0.5).sum()) / (2 * len(held)))
    return {"model": model, "info": {
        "repo": str(repo), "n": args.n, "sizes": sizes, "steps": args.steps, "epochs": args.epochs,
        "seed": args.seed, "light": {"unet": light_name, "model": light_model},
        "heavy": {"unet": heavy_name, "model": heavy_model}, "trained_on": len(fit), "held_out": len(held),
        "held_out_accuracy": round(accuracy, 4),
        "held_out_scores": {"light": [round(float(x), 6) for x in light_held],
                            "heavy": [round(float(x), 6) for x in heavy_held]}}}


def write_gate(repo: Path, model, info: dict) -> list[Path]:
    """The weights where the quality_gate model loads them; `trained` in pipeline.json and the manifest."""
    from triffusion.orchestrator.gate import save_gate

    written = [save_gate(model, repo / GATE_REL, source="perf.train_gate: heavy (real) vs light (generated)",
                         steps=info["steps"], n=info["n"], held_out_accuracy=info["held_out_accuracy"])]
    note = {"trained": True, "trained_by": "perf.train_gate", "held_out_accuracy": info["held_out_accuracy"]}
    return written + update_pipeline(repo, "gate", lambda gate: gate.update(note))


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.train_gate", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository", help="a built model repository with a cascade")
    ap.add_argument("--n", type=int, default=48, help="prompts (each answered by both models)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", default="64,128", help="image sides, the prompts split evenly among them")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default=str(PROMPTS_PATH), help="one prompt per line")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    ap.add_argument("--server-log", default=None)
    ap.add_argument("--out", help="also write the run's info (held-out scores, accuracy) as JSON here")
    ap.add_argument("--write", action="store_true", help="install the weights in the repository")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except (ProfileError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = result["info"]
    print(f"held-out accuracy {info['held_out_accuracy']:.3f} on {info['held_out']} pairs; mean score light "
          f"{np.mean(info['held_out_scores']['light']):.4f}, heavy {np.mean(info['held_out_scores']['heavy']):.4f}")
    if args.out:
        write_json(args.out, {"bench": "train_gate", "command": "python -m perf.train_gate " + " ".join(
            argv if argv is not None else sys.argv[1:]), **info})
    if args.write:
        for path in write_gate(Path(args.repo), result["model"], info):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
