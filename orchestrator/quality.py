"""Step predictor (after SD-as-a-Service): from profiled curves of quality (CLIP score) and latency
against steps, per model and hardware, pick the step count that meets a request's slo_ms and
min_quality, cheapest first; shortest-job-first then orders by the predicted time."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class StepProfile:
    """Measured points for one (model, hardware, resolution): steps -> quality, steps -> seconds."""

    steps: tuple[int, ...]
    quality: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self):
        if not (len(self.steps) == len(self.quality) == len(self.seconds)) or not self.steps:
            raise ValueError("steps, quality and seconds must be equally long and non-empty")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError("steps must be strictly increasing")

    def _interp(self, values, steps: int, extrapolate: bool) -> float:
        """Piecewise linear; outside the measured range quality holds its end value, while time follows
        the nearest segment (a fixed cost plus a per-step cost)."""
        xs = self.steps
        if len(xs) == 1:
            return values[0] * steps / xs[0] if extrapolate else values[0]
        if not extrapolate and (steps <= xs[0] or steps >= xs[-1]):
            return values[0] if steps <= xs[0] else values[-1]
        i = min(max(bisect.bisect_left(xs, steps), 1), len(xs) - 1)
        if xs[i] == steps:
            return values[i]
        w = (steps - xs[i - 1]) / (xs[i] - xs[i - 1])
        return values[i - 1] + w * (values[i] - values[i - 1])

    def quality_at(self, steps: int) -> float:
        return self._interp(self.quality, steps, extrapolate=False)

    def seconds_at(self, steps: int) -> float:
        return self._interp(self.seconds, steps, extrapolate=True)

    def min_steps_for(self, min_quality: float) -> int | None:
        """The fewest steps whose profiled quality reaches min_quality (never fewer than the fewest profiled:
        below them the curve is unknown); None when even the most profiled steps fall short."""
        for steps in range(self.steps[0], self.steps[-1] + 1):
            if self.quality_at(steps) >= min_quality:
                return steps
        return None

    @classmethod
    def from_dict(cls, data: dict) -> "StepProfile":
        return cls(tuple(int(s) for s in data["steps"]), tuple(float(q) for q in data["quality"]),
                   tuple(float(t) for t in data["seconds"]))


@dataclass(frozen=True)
class StepChoice:
    steps: int
    quality: float
    seconds: float
    meets_quality: bool


def choose_steps(profile: StepProfile, *, slo_s: float | None, min_quality: float | None,
                 max_steps: int, min_steps: int = 1, queue_s: float = 0.0) -> StepChoice | None:
    """The fewest steps reaching min_quality within the SLO; without min_quality, the best quality within
    the SLO; if min_quality cannot be reached in time, the best quality in time (meets_quality False).
    None when not even min_steps fits the SLO."""
    fits = [s for s in range(min_steps, max_steps + 1)
            if slo_s is None or queue_s + profile.seconds_at(s) <= slo_s]
    if not fits:
        return None
    choice = lambda s, ok: StepChoice(s, profile.quality_at(s), profile.seconds_at(s), ok)
    if min_quality is not None:
        for s in fits:
            if profile.quality_at(s) >= min_quality:
                return choice(s, True)
    best = max(fits, key=lambda s: (profile.quality_at(s), -s))
    return choice(best, min_quality is None)
