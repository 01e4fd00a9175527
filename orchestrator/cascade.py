"""Model cascades (after DiffServe): a light model answers first; a quality gate scores the result and,
below a threshold, the query is redone on the heavy model. A load-adaptive controller re-chooses the
threshold, the step budget and the split of GPUs between variants as demand changes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class CascadeRouter:
    threshold: float
    accepted: int = 0
    escalated: int = 0

    def route(self, score: float) -> str:
        """'light' keeps the light model's image; 'heavy' redoes the query on the heavy model."""
        if score >= self.threshold:
            self.accepted += 1
            return "light"
        self.escalated += 1
        return "heavy"

    @property
    def escalation_rate(self) -> float:
        total = self.accepted + self.escalated
        return self.escalated / total if total else 0.0


@dataclass(frozen=True)
class Option:
    """One operating point measured offline: at this gate threshold and step budget, the fraction of
    queries escalated, the mean quality of the answers, and GPU-seconds per query on each model."""

    threshold: float
    steps: int
    escalation: float
    quality: float
    light_s: float
    heavy_s: float


@dataclass(frozen=True)
class Decision:
    option: Option
    light_gpus: int
    heavy_gpus: int
    inputs: dict = field(default_factory=dict)  # exported with the decision as metrics


def feasible_split(option: Option, demand: float, gpus: int, utilization: float) -> tuple[int, int] | None:
    """Fewest heavy GPUs that carry the escalated load, the rest light; None if the light load then
    does not fit. Closed form: light needs demand*light_s, heavy demand*escalation*heavy_s GPU-s/s."""
    heavy_load = demand * option.escalation * option.heavy_s
    heavy = math.ceil(heavy_load / utilization - 1e-12) if heavy_load > 0 else 0
    light = gpus - heavy
    if light < 0 or (light == 0 and demand * option.light_s > 0) or demand * option.light_s > light * utilization + 1e-12:
        return None
    return light, heavy


def choose(options: list[Option], demand: float, gpus: int, utilization: float = 0.8) -> Decision | None:
    """Highest quality operating point whose load fits the GPUs (ties: fewer heavy GPUs, then fewer steps)."""
    best = None
    for option in options:
        split = feasible_split(option, demand, gpus, utilization)
        if split is None:
            continue
        key = (option.quality, -split[1], -option.steps)
        if best is None or key > best[0]:
            best = (key, Decision(option, *split, inputs={"demand": demand, "gpus": gpus, "utilization": utilization}))
    return best[1] if best else None
