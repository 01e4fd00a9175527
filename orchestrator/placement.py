"""Where a request runs when one orchestrator drives several devices (one engine per device): plain Python,
no tensors, no Triton.

A device is described by a `DeviceView` taken under its engine's lock: its queue, its running set, and the
finish its own scheduler forecasts for the request if it joined there (the admission forecast: the
step-level schedule played forward with that device's learned latencies). Policies order the devices;
the group submits to the first and, when that device's admission refuses, to the next, so a request is
rejected only when no eligible device can take it.

- `least_finish` (the default): earliest predicted finish; finishes within `slack` of the earliest count as
  equal (a forecast is not that precise, and batching makes joining a busy device look almost free), and
  among those the fewest requests, then the lowest index, win. It sees what a queue count cannot: a device
  whose requests are large or many steps from done.
- `least_loaded`: fewest requests waiting or running (what a proxy's least-connections sees).
- `round_robin`: in turn, blind to load (the comparison baseline).

Cascades split by the controller (DiffServe): with `roles`, the light devices take requests that start on
the light model and the heavy devices those that start on the heavy one (an escalation is redone in
place, on the device that ran the light model, keeping its slot and text embeddings). When the eligible
pool cannot take a request, the other devices may."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Protocol

ROLES = ("any", "light", "heavy")


@dataclass(frozen=True)
class DeviceView:
    """One device's load as its scheduler sees it, with the forecast finish of the request being placed."""

    index: int
    waiting: int
    running: int
    predicted_s: float  # seconds from now to the request's forecast finish there; inf when it cannot say
    closed: bool = False
    role: str = "any"

    @property
    def load(self) -> int:
        return self.waiting + self.running


class Placement(Protocol):
    def order(self, views: list[DeviceView]) -> list[int]:
        """Device indices, best first; closed devices are left out."""


class LeastFinish:
    name = "least_finish"

    def __init__(self, slack: float = 0.1, slack_min_s: float = 0.05):
        self.slack, self.slack_min_s = slack, slack_min_s

    def order(self, views):
        open_ = [v for v in views if not v.closed]
        if not open_:
            return []
        best = min(v.predicted_s for v in open_)
        tied = best + max(self.slack * best, self.slack_min_s) if math.isfinite(best) else math.inf
        # Within the slack, by load; beyond it, by forecast.
        return [v.index for v in sorted(open_, key=lambda v: (v.predicted_s > tied, v.load if v.predicted_s <= tied
                                                              else v.predicted_s, v.load, v.index))]


class LeastLoaded:
    name = "least_loaded"

    def order(self, views):
        return [v.index for v in sorted((v for v in views if not v.closed), key=lambda v: (v.load, v.index))]


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._turn = itertools.count()

    def order(self, views):
        open_ = [v.index for v in views if not v.closed]
        if not open_:
            return []
        k = next(self._turn) % len(open_)
        return open_[k:] + open_[:k]


PLACEMENTS = {p.name: p for p in (LeastFinish, LeastLoaded, RoundRobin)}


def create_placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]()
    except KeyError:
        raise ValueError(f"placement '{name}' is unknown; choose one of: {', '.join(PLACEMENTS)}") from None


def split_roles(devices: int, light: int, heavy: int) -> list[str]:
    """Device roles for a controller's split of `devices` into light and heavy GPUs: the first `light`
    devices light, the last `heavy` heavy, any left over serve both. A split that does not fit is an error."""
    if devices < 1:
        raise ValueError(f"devices: {devices} is out of range; allowed >= 1")
    if light < 0 or heavy < 0 or light + heavy > devices:
        raise ValueError(f"split: {light} light + {heavy} heavy does not fit {devices} devices")
    if light == 0 or heavy == 0:  # one kind only: every device serves both (nothing to separate)
        return ["any"] * devices
    return ["light"] * light + ["any"] * (devices - light - heavy) + ["heavy"] * heavy


def candidates(views: list[DeviceView], placement: Placement, role: str | None) -> list[int]:
    """Devices to try, in order: the policy's order within the pool that serves `role` ("light" or "heavy"
    for a request that starts on that model; None: any device), then the rest in the policy's order."""
    ordered = placement.order(views)
    if role is None:
        return ordered
    roles = {v.index: v.role for v in views}
    pool = [i for i in ordered if roles[i] in (role, "any")]
    return pool + [i for i in ordered if i not in pool]
