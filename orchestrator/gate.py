"""The cascade's quality gate (after DiffServe): a small image discriminator that scores how real a
generated image looks, or, where CLIP weights exist, how well the image matches its prompt by CLIP.
A light model's answer scoring below the cascade threshold is redone on the heavy model.

Users train it on their own images: real photos against images the light model generated for the
same kind of prompts (DiffServe trains on real vs generated, then picks the threshold by the fraction
of queries it should escalate). `calibrate_threshold` turns "escalate this fraction" into a threshold.

    python -m triffusion.orchestrator.gate train --real photos/ --generated light_outputs/ --out gate.pt
    python -m triffusion.export build ... --gate gate.pt      (served as the Triton model quality_gate)

The CLIP gate needs no training: `--gate clip:FOLDER` (a transformers CLIPModel saved with
save_pretrained, or a hub id on a host that reaches the hub) copies it into the repository;
`--gate clip:random` builds a tiny seeded one for tests. Its score is (1 + cosine) / 2, in [0, 1]:
monotone in CLIP score (100 * cosine), so CLIP score 30 is 0.65.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .clip import ClipScorer

INPUT_SIZE = 64  # images are resized to this square before scoring: the gate must be cheap


class Discriminator(nn.Module):
    """Four strided convolutions and a linear head: about 0.1 M parameters, well under a millisecond
    per image on a GPU, so gating costs nothing next to a UNet step."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.features = nn.Sequential(*[layer for a, b in zip(chans, chans[1:]) for layer in
                                        (nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2))])
        self.head = nn.Linear(chans[-1], 1)
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [-1, 1] -> (N,) logits of "real"."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


def to_input(images: np.ndarray | list) -> torch.Tensor:
    """uint8 (N, H, W, 3) or a list of (H, W, 3) of any sizes -> (N, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    batch = []
    for image in images:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        batch.append(F.interpolate(tensor, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                   antialias=True))
    return torch.cat(batch)


@dataclass
class Gate:
    """A discriminator ready to score: probability in [0, 1] that an image is real."""

    model: Discriminator
    device: str = "cpu"

    def score(self, images, prompts=None) -> np.ndarray:
        """One score per image; the discriminator looks at the image alone, so `prompts` is ignored."""
        with torch.inference_mode():
            logits = self.model(to_input(images).to(self.device))
        return torch.sigmoid(logits).float().cpu().numpy()


@dataclass
class ClipGate:
    """(1 + cos(image, prompt)) / 2 per image against its own prompt: in [0, 1] like the discriminator's
    and monotone in CLIP score (CLIP score 30 is 0.65). Unlike CLIP score it does not clamp negative
    cosines to one tied value, so a threshold can split them too."""

    scorer: ClipScorer

    def score(self, images, prompts=None) -> np.ndarray:
        if prompts is None or len(prompts) != len(images):
            got = "none" if prompts is None else len(prompts)
            raise ValueError(f"prompt: the CLIP gate scores each image against its prompt; expected "
                             f"{len(images)} prompts, got {got}")
        return ((1.0 + self.scorer.cosine(list(images), list(prompts))) / 2.0).astype(np.float32)


def save_clip_gate(source: str, folder: str | Path, seed: int = 0) -> Path:
    """Copy CLIP weights (a local folder or hub id; "random": a tiny seeded CLIP) into `folder`."""
    scorer = ClipScorer.random(seed=seed) if source == "random" else ClipScorer.pretrained(source)
    folder = Path(folder)
    scorer.model.save_pretrained(folder)
    scorer.processor.save_pretrained(folder)
    return folder


def random_gate(seed: int = 0, width: int = 32) -> Discriminator:
    """Seeded random weights: the architecture and cost of a trained gate, for speed runs."""
    torch.manual_seed(seed)
    return Discriminator(width).eval()


def save_gate(model: Discriminator, path: str | Path, **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"width": model.width, "state_dict": model.state_dict(), "meta": meta}, path)
    return path


def load_gate(path: str | Path, device: str = "cpu") -> Gate | ClipGate:
    """Discriminator weights (a file from `save_gate`) or a CLIP gate (a folder from `save_clip_gate`)."""
    path = Path(path)
    if path.is_dir():
        return ClipGate(ClipScorer.pretrained(str(path.resolve()), device=device))
    if not path.exists():
        raise FileNotFoundError(f"gate weights {path} do not exist; train them with "
                                "`python -m triffusion.orchestrator.gate train` or export with a random gate")
    data = torch.load(path, map_location="cpu", weights_only=True)
    model = Discriminator(data["width"])
    model.load_state_dict(data["state_dict"])
    return Gate(model.to(device).eval(), device)


def train(real: list[np.ndarray], generated: list[np.ndarray], *, epochs: int = 10, batch: int = 32,
          lr: float = 2e-4, seed: int = 0, width: int = 32, log=print) -> Discriminator:
    """Binary cross-entropy, real = 1, generated = 0, with horizontal flips; returns the trained model."""
    if not real or not generated:
        raise ValueError("train: needs at least one real and one generated image")
    torch.manual_seed(seed)
    model = Discriminator(width)
    x = torch.cat([to_input(real), to_input(generated)])
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(generated))])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            inputs = x[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            inputs = torch.where(flip[:, None, None, None], inputs.flip(3), inputs)
            loss = F.binary_cross_entropy_with_logits(model(inputs), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    return model.eval()


def calibrate_threshold(scores: np.ndarray, escalate_fraction: float) -> float:
    """The threshold under which `escalate_fraction` of these (light-model) scores fall: the gate then
    escalates that fraction of similar traffic."""
    if not 0.0 <= escalate_fraction <= 1.0:
        raise ValueError(f"escalate_fraction: {escalate_fraction} is out of range; allowed 0..1")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if escalate_fraction == 0.0:
        return float(np.nextafter(ordered[0], -np.inf))
    k = int(round(escalate_fraction * len(ordered)))
    if k >= len(ordered):
        return float(np.nextafter(ordered[-1], np.inf))
    # Midway between the k-th and (k+1)-th score: exactly k scores fall below it.
    return float((ordered[k - 1] + ordered[k]) / 2) if k > 0 else float(np.nextafter(ordered[0], -np.inf))


def read_images(folder: str | Path) -> list[np.ndarray]:
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"{folder}: no .png/.jpg/.webp images")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triffusion.orchestrator.gate", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the discriminator on real vs generated images")
    t.add_argument("--real", required=True, type=Path)
    t.add_argument("--generated", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--escalate", type=float, help="also print the threshold that escalates this fraction "
                   "of the generated images")
    args = ap.parse_args(argv)
    try:
        real, generated = read_images(args.real), read_images(args.generated)
        model = train(real, generated, epochs=args.epochs, seed=args.seed)
        save_gate(model, args.out, real=len(real), generated=len(generated), epochs=args.epochs)
        gate = Gate(model)
        accuracy = ((gate.score(real) >= 0.5).mean() * len(real) + (gate.score(generated) < 0.5).mean()
                    * len(generated)) / (len(real) + len(generated))
        print(f"{args.out}: trained on {len(real)} real and {len(generated)} generated images; "
              f"training accuracy {accuracy:.3f}")
        if args.escalate is not None:
            print(f"threshold escalating {args.escalate:.0%}: {calibrate_threshold(gate.score(generated), args.escalate):.6f}")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
