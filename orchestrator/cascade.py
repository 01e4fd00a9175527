"""Model cascades (after DiffServe): a light model answers first; a quality gate scores the result and,
below a threshold, the query is redone on the heavy model. A load-adaptive controller re-chooses the
threshold, the step budget and the split of GPUs between variants as demand changes."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import numpy as np

log = logging.getLogger(__name__)


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

    def loads(self, demand: float) -> tuple[float, float]:
        """GPU-seconds a second at `demand` req/s: (light, heavy). The light model sees every query, the heavy
        one the escalated."""
        return demand * self.light_s, demand * self.escalation * self.heavy_s


@dataclass(frozen=True)
class Decision:
    option: Option
    light_gpus: int
    heavy_gpus: int
    inputs: dict = field(default_factory=dict)  # exported with the decision as metrics


def feasible_split(option: Option, demand: float, gpus: int, utilization: float) -> tuple[int, int] | None:
    """Fewest heavy GPUs that carry the escalated load, the rest light; None if the light load then
    does not fit. Closed form: light needs demand*light_s, heavy demand*escalation*heavy_s GPU-s/s.
    (`choose` solves a MILP; this exact form checks the one option the solver picked.)"""
    light_load, heavy_load = option.loads(demand)
    heavy = math.ceil(heavy_load / utilization - 1e-12) if heavy_load > 0 else 0
    light = gpus - heavy
    if light < 0 or (light == 0 and light_load > 0) or light_load > light * utilization + 1e-12:
        return None
    return light, heavy


def carries(decision: Decision, demand: float, gpus: int, utilization: float) -> bool:
    """Whether `decision` (its option on its split of the GPUs) carries `demand` within `utilization`."""
    light, heavy = decision.option.loads(demand)
    if gpus == 1:  # both models time-share the one device
        return light + heavy <= utilization + 1e-12
    return light <= decision.light_gpus * utilization + 1e-12 and heavy <= decision.heavy_gpus * utilization + 1e-12


def _ranks(values) -> list[int]:
    """Dense ranks, 0 for the smallest; equal values share a rank."""
    index = {value: i for i, value in enumerate(sorted(set(values)))}
    return [index[value] for value in values]


def choose(options: list[Option], demand: float, gpus: int, utilization: float = 0.8) -> Decision | None:
    """The controller's mixed-integer program (DiffServe), solved by HiGHS through scipy.optimize.milp.

    Variables: x_i in {0, 1} per operating point, sum x_i = 1. With gpus >= 2, integer GPU counts L, H
    (L + H <= gpus), each model on GPUs of its own:
        sum_i demand * light_s_i * x_i <= utilization * L             (the light model sees every query)
        sum_i demand * escalation_i * heavy_s_i * x_i <= utilization * H   (the heavy one the escalated)
        L >= x_i, H >= x_i for the options that put load on that model (a loaded model needs a GPU).
    With gpus == 1 both models time-share the one device: continuous shares a_L + a_H <= 1 in place of
    L and H in the same two load rows.
    Objective: maximise quality; ties go to fewer heavy GPUs (one device: the smaller heavy share), then
    to fewer steps. The tie-break terms are weighted so that they can never outweigh a quality
    difference, however small: quality, steps (and on one device the heavy load) enter as the option's
    dense rank in that key, H as itself, each scaled by one more than the largest value the terms after
    it can take. The objective is then integer and lexicographic, exact where epsilons on raw qualities
    would drown in the solver's tolerances (HiGHS: about 1e-6).

    The decision: gpus >= 2: light_gpus = gpus - H (every GPU the heavy model does not need serves the
    light one), heavy_gpus = H. gpus == 1: light_gpus = 1, heavy_gpus = 1 when the heavy model shares the
    device (anything escalates) else 0; `inputs` carry light_share and heavy_share (heavy: the share its
    load needs at `utilization`; light: the rest). None when no option fits (or no GPU)."""
    if not options or gpus < 1:
        return None
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported on first use: ~0.5 s

    n, shared = len(options), gpus == 1
    light_load = np.array([demand * o.light_s for o in options], dtype=np.float64)
    heavy_load = np.array([demand * o.escalation * o.heavy_s for o in options], dtype=np.float64)
    quality, steps = _ranks([o.quality for o in options]), _ranks([o.steps for o in options])
    step_span = max(steps) + 1
    if shared:  # ties: the smaller heavy load (its share), then fewer steps; a_H itself weighs < 1
        heavy_rank = _ranks(heavy_load.tolist())
        top = (max(heavy_rank) + 1) * step_span
        cost = np.array([-q * top + h * step_span + s for q, h, s in zip(quality, heavy_rank, steps)] + [0.0, 0.5])
    else:  # ties: fewer heavy GPUs (H <= gpus), then fewer steps
        top = (gpus + 1) * step_span
        cost = np.array([-q * top + s for q, s in zip(quality, steps)] + [0.0, float(step_span)])
    # Rows over [x_0 .. x_n-1, L, H] (one device: [x.., a_L, a_H]).
    rows, low, high = [], [], []

    def row(coefficients, lo, hi):
        rows.append(coefficients)
        low.append(lo)
        high.append(hi)

    row([1.0] * n + [0.0, 0.0], 1.0, 1.0)  # exactly one operating point
    row([0.0] * n + [1.0, 1.0], 0.0, 1.0 if shared else float(gpus))  # the device(s) split between models
    row(list(light_load / utilization) + [-1.0, 0.0], -np.inf, 0.0)
    row(list(heavy_load / utilization) + [0.0, -1.0], -np.inf, 0.0)
    if not shared:
        row([-float(load > 0) for load in light_load] + [1.0, 0.0], 0.0, np.inf)
        row([-float(load > 0) for load in heavy_load] + [0.0, 1.0], 0.0, np.inf)
    integrality = np.array([1] * n + ([0, 0] if shared else [1, 1]))
    upper = np.array([1.0] * n + ([1.0, 1.0] if shared else [float(gpus)] * 2))
    inputs = {"demand": demand, "gpus": gpus, "utilization": utilization, "solver": "milp"}
    # HiGHS accepts a point within ~1e-6 of integral and feasible: the option it picks is checked in exact
    # arithmetic, and a pick that only its tolerance made feasible is cut off (excluded, or its heavy GPU
    # count pinned to the exact need) and the program solved again. In practice the first answer stands.
    for _ in range(2 * n + 1):
        result = milp(cost, integrality=integrality, bounds=Bounds(np.zeros(n + 2), upper),
                      constraints=LinearConstraint(np.array(rows), np.array(low), np.array(high)),
                      options={"mip_rel_gap": 0.0, "time_limit": 10.0})
        if result.x is None:
            if result.status != 2:  # 2: infeasible; anything else is the solver's failure, not overload
                log.warning("cascade controller: the MILP has no solution (%s); nothing chosen", result.message)
            return None
        i = int(np.argmax(result.x[:n]))
        option = options[i]
        if shared:
            if light_load[i] + heavy_load[i] <= utilization + 1e-12:
                heavy_share = float(heavy_load[i] / utilization)
                return Decision(option, 1, int(heavy_load[i] > 0),
                                inputs={**inputs, "light_load": float(light_load[i]),
                                        "heavy_load": float(heavy_load[i]), "light_share": 1.0 - heavy_share,
                                        "heavy_share": heavy_share})
            upper[i] = 0.0
            continue
        heavy = int(round(result.x[n + 1]))
        split = feasible_split(option, demand, gpus, utilization)
        if split is not None and split[1] == heavy:
            return Decision(option, *split, inputs={**inputs, "light_load": float(light_load[i]),
                                                    "heavy_load": float(heavy_load[i])})
        if split is None:
            upper[i] = 0.0
        else:  # H = exact need when x_i = 1: H >= h x_i and H <= h + gpus (1 - x_i)
            unit = [0.0] * n
            unit[i] = -float(split[1])
            row(unit + [0.0, 1.0], 0.0, np.inf)
            unit = [0.0] * n
            unit[i] = float(gpus)
            row(unit + [0.0, 1.0], -np.inf, float(split[1] + gpus))
    return None


def _overloaded(option: Option, demand: float, gpus: int, utilization: float) -> Decision:
    """Nothing fits: the cheapest option on every GPU (one device: shares in proportion to the loads)."""
    inputs = {"demand": demand, "gpus": gpus, "utilization": utilization, "overloaded": True}
    if gpus != 1:
        return Decision(option, gpus, 0, inputs=inputs)
    light_load, heavy_load = option.loads(demand)
    total = light_load + heavy_load
    heavy_share = heavy_load / total if total > 0 else 0.0
    return Decision(option, 1, int(heavy_load > 0),
                    inputs={**inputs, "light_load": light_load, "heavy_load": heavy_load,
                            "light_share": 1.0 - heavy_share, "heavy_share": heavy_share})


@dataclass
class LoadController:
    """Re-chooses the cascade's operating point as demand changes (DiffServe's controller): every
    `interval_s` it estimates the arrival rate (EWMA over windows) and picks, with `choose`, the highest
    quality option that the GPUs carry at that rate. Decisions and their inputs go out as metrics.

    Up at once, down slowly (as autoscalers do): between windows, once the last `surge_arrivals` arrivals
    came faster than both the demand estimate and what the operating point in force carries, it decides at
    once on that rate (no EWMA: an overloaded cascade misses SLOs for as long as it waits), unless nothing fits
    already (the cheapest option is in force; re-deciding would only ratchet the estimate up). A fall in load
    waits for the window and the EWMA, so a short lull does not buy back quality the next second takes."""

    options: list[Option]
    gpus: int = 1
    utilization: float = 0.8
    interval_s: float = 5.0
    alpha: float = 0.5  # EWMA weight of the newest window
    surge_arrivals: int = 16  # arrivals the surge check measures the rate over (0: decide only at windows' ends)
    demand: float | None = None
    _window_start: float | None = None
    _arrivals: int = 0
    last: Decision | None = None
    _recent: deque = field(default_factory=deque)  # the last surge_arrivals arrival times

    def __post_init__(self):
        # The solver's import (about 0.3-0.5 s) here, when the model loads: the first decision runs inside the
        # scheduler's lock, with admissions waiting on it.
        if self.options:
            import scipy.optimize  # noqa: F401

    def observe_arrival(self, now: float) -> None:
        """One arrival at `now`: when its front received it (a clump of arrivals reaching the engine together,
        after a slow iteration, must not read as a surge)."""
        if self._window_start is None:
            self._window_start = now
        self._arrivals += 1
        if self.surge_arrivals > 1:
            self._recent.append(now)
            if len(self._recent) > self.surge_arrivals:
                self._recent.popleft()

    def surge_rate(self) -> float | None:
        """The arrival rate over the last `surge_arrivals` arrivals when it outruns both the demand estimate and
        the operating point in force (what `decide` then acts on at once); else None."""
        if self.last is None or self.surge_arrivals < 2 or len(self._recent) < self.surge_arrivals:
            return None
        if self.last.inputs.get("overloaded"):  # the cheapest option on every GPU already: nowhere to go
            return None
        span = max(self._recent) - min(self._recent)  # times the fronts received them: not quite in order
        if span <= 0:  # no rate to measure (all at one clock reading)
            return None
        rate = (len(self._recent) - 1) / span
        if rate <= (self.demand or 0.0) or carries(self.last, rate, self.gpus, self.utilization):
            return None
        return rate

    def due_at(self) -> float | None:
        """The earliest time `decide` makes a decision (None before the first arrival)."""
        return None if self._window_start is None else self._window_start + self.interval_s

    def decide(self, now: float) -> Decision | None:
        """A new decision when a window has closed or arrivals surged past the operating point, else None."""
        surge = None
        if self._window_start is None or now - self._window_start < self.interval_s:
            surge = self.surge_rate()
            if surge is None:
                return None
            self.demand = surge
            self._recent.clear()  # the next surge is measured on arrivals after this decision
        else:
            rate = self._arrivals / (now - self._window_start)
            self.demand = rate if self.demand is None else (1 - self.alpha) * self.demand + self.alpha * rate
        self._window_start, self._arrivals = now, 0
        decision = choose(self.options, self.demand, self.gpus, self.utilization)
        if decision is None:  # nothing fits: the cheapest option sheds the least
            cheapest = min(self.options, key=lambda o: o.light_s + o.escalation * o.heavy_s)
            decision = _overloaded(cheapest, self.demand, self.gpus, self.utilization)
        if surge is not None:
            decision = replace(decision, inputs={**decision.inputs, "surge": True})
        self.last = decision
        return decision

    def state(self, now: float) -> dict:
        """Where the controller stands (the engine's `profile` reports it): its demand estimate, the window it
        is counting and the operating point in force. A simulator predicting what comes next starts its
        controller here (`restore`), as the server's goes on from here."""
        last = self.last
        return {"demand": self.demand, "arrivals": self._arrivals,
                "window_age_s": None if self._window_start is None else round(now - self._window_start, 4),
                "option": None if last is None else asdict(last.option),
                "light_gpus": None if last is None else last.light_gpus,
                "heavy_gpus": None if last is None else last.heavy_gpus,
                "overloaded": last is not None and bool(last.inputs.get("overloaded")),
                "recent_ages_s": [round(now - t, 4) for t in self._recent]}

    def restore(self, state: dict, now: float) -> None:
        """Continue from `state` (what `state` returned), `now` on this controller's clock."""
        self.demand = state.get("demand")
        self._arrivals = int(state.get("arrivals") or 0)
        age = state.get("window_age_s")
        self._window_start = None if age is None else now - age
        self._recent = deque(now - a for a in state.get("recent_ages_s") or [])
        option = state.get("option")
        self.last = None if option is None else Decision(Option(**option), int(state.get("light_gpus") or 0),
                                                          int(state.get("heavy_gpus") or 0),
                                                          inputs={"overloaded": True} if state.get("overloaded") else {})


def options_from(rows: list[dict]) -> list[Option]:
    """Operating points from the registry (cascade.options), validated by the registry loader."""
    return [Option(**row) for row in rows]
