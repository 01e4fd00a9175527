"""Waiting on a condition with a deadline, and reading the server's request counters."""

from __future__ import annotations

import time

import pytest

from perf import metrics_text


def wait_for(condition, timeout_s: float, what: str):
    """Poll `condition` until it returns something truthy (returned); fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.05)


def counter(server, name: str, **labels) -> float:
    return metrics_text.value(metrics_text.scrape(server.metrics), name, **labels)


def cancelled(server) -> float:
    """Requests the orchestrator ended as cancelled: counted once it freed their slot."""
    return counter(server, "triffusion_requests_total", outcome="cancelled")


def unet_calls(server) -> float:
    return counter(server, "triffusion_unet_batch_rows_count")
