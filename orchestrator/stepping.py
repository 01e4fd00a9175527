"""Per-query step selection (after QoS-Diff): watch the entropy of the latent across steps and end the
denoising once it has settled; the sampler then takes one last step straight to the clean sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def latent_entropy(latents: torch.Tensor, bins: int = 64, limit: float = 4.0) -> float:
    """Shannon entropy (bits) of the histogram of latent values, clipped to [-limit, limit]."""
    values = latents.detach().float().flatten().clamp(-limit, limit)
    counts = torch.histc(values, bins=bins, min=-limit, max=limit)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@dataclass
class EntropyStop:
    """Settled when the entropy changed by less than `threshold` bits for `patience` consecutive steps,
    and not before `min_fraction` of the requested steps ran. Thresholds are per model (registry)."""

    threshold: float = 0.01
    patience: int = 2
    min_fraction: float = 0.4
    min_steps: int = 0  # and not before this many (the request's quality floor on the step-quality profile)
    history: list[float] = field(default_factory=list)

    def observe(self, entropy: float, steps_done: int, steps_total: int) -> bool:
        """Record the latent's entropy after a step (the runner measures it with `latent_entropy`); True
        when the remaining steps can be skipped."""
        self.history.append(float(entropy))
        if (steps_done < max(1, int(self.min_fraction * steps_total), self.min_steps)
                or len(self.history) <= self.patience):
            return False
        recent = self.history[-(self.patience + 1):]
        return all(abs(b - a) < self.threshold for a, b in zip(recent, recent[1:]))
