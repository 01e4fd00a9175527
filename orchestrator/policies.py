"""Ordering policies: which waiting request takes a free slot first, and which running requests share
the first UNet batch when a bucket overflows. Each is a small class with one sort key; lower goes first."""

from __future__ import annotations

from .request import RequestState


class Policy:
    name = "base"

    def key(self, state: RequestState, now: float) -> tuple:
        raise NotImplementedError

    def order(self, states, now: float) -> list[RequestState]:
        return sorted(states, key=lambda s: self.key(s, now))


class FCFS(Policy):
    name = "fcfs"

    def key(self, state, now):
        return (state.arrival, state.seq)


class EDF(Policy):
    """Earliest deadline first; a priority level moves the deadline earlier by a fixed amount, so a
    low-priority request is delayed by at most that amount and never starves. A best-effort request
    (no slo_ms) is ordered as if due `best_effort_s` after its arrival: it ages like any other and its
    priority counts too."""

    name = "edf"

    def __init__(self, priority_boost_s: float = 1.0, best_effort_s: float = 30.0):
        self.priority_boost_s, self.best_effort_s = priority_boost_s, best_effort_s

    def key(self, state, now):
        deadline = state.deadline if state.deadline is not None else state.arrival + self.best_effort_s
        return (deadline - state.priority * self.priority_boost_s, state.arrival, state.seq)


class SRPT(Policy):
    """Shortest remaining work first (SD-as-a-Service's shortest-job-first): remaining UNet rows x steps
    weighted by latent size."""

    name = "srpt"

    def key(self, state, now):
        return (state.remaining_work, state.arrival, state.seq)


class Priority(Policy):
    """Strict priority levels with aging: every `aging_s` waited counts as one more level."""

    name = "priority"

    def __init__(self, aging_s: float = 5.0):
        self.aging_s = aging_s

    def key(self, state, now):
        effective = state.priority + (now - state.arrival) / self.aging_s
        return (-effective, state.arrival, state.seq)


POLICIES = {cls.name: cls for cls in (FCFS, EDF, SRPT, Priority)}


def create_policy(name: str, **options) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}'; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](**options)
