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


@dataclass
class LoadController:
    """Re-chooses the cascade's operating point as demand changes (DiffServe's controller): every
    `interval_s` it estimates the arrival rate (EWMA over windows) and picks, with `choose`, the highest
    quality option that the GPUs carry at that rate. Decisions and their inputs go out as metrics."""

    options: list[Option]
    gpus: int = 1
    utilization: float = 0.8
    interval_s: float = 5.0
    alpha: float = 0.5  # EWMA weight of the newest window
    demand: float | None = None
    _window_start: float | None = None
    _arrivals: int = 0
    last: Decision | None = None

    def observe_arrival(self, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
        self._arrivals += 1

    def due_at(self) -> float | None:
        """The earliest time `decide` makes a decision (None before the first arrival)."""
        return None if self._window_start is None else self._window_start + self.interval_s

    def decide(self, now: float) -> Decision | None:
        """A new decision when a window has closed, else None."""
        if self._window_start is None or now - self._window_start < self.interval_s:
            return None
        rate = self._arrivals / (now - self._window_start)
        self.demand = rate if self.demand is None else (1 - self.alpha) * self.demand + self.alpha * rate
        self._window_start, self._arrivals = now, 0
        decision = choose(self.options, self.demand, self.gpus, self.utilization)
        if decision is None:  # nothing fits: the cheapest option sheds the least
            cheapest = min(self.options, key=lambda o: o.light_s + o.escalation * o.heavy_s)
            decision = Decision(cheapest, self.gpus, 0, inputs={"demand": self.demand, "gpus": self.gpus,
                                                                  "utilization": self.utilization, "overloaded": True})
        self.last = decision
        return decision


def options_from(rows: list[dict]) -> list[Option]:
    """Operating points from the registry (cascade.options), validated by the registry loader."""
    return [Option(**row) for row in rows]
