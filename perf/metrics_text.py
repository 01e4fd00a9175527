"""Read values out of Triton's Prometheus text (/metrics): benchmarks diff them around a run."""

from __future__ import annotations

import re
import urllib.request

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+([-+0-9.eEinfa]+)$')


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(name, sorted label pairs): value} for every sample line."""
    samples = {}
    for line in text.splitlines():
        match = LINE.match(line.strip())
        if not match:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(re.findall(r'([a-zA-Z_]+)="([^"]*)"', labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    return parse(urllib.request.urlopen(url, timeout=10).read().decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def mean_between(before: dict, after: dict, name: str, **labels) -> float | None:
    """Mean of a histogram's observations made between two scrapes (None when there were none)."""
    count = value(after, f"{name}_count", **labels) - value(before, f"{name}_count", **labels)
    total = value(after, f"{name}_sum", **labels) - value(before, f"{name}_sum", **labels)
    return total / count if count > 0 else None


def delta(before: dict, after: dict, name: str, **labels) -> float:
    """How much one sample (a counter, a histogram's _sum or _count) grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def counts_by_label(before: dict, after: dict, name: str, label: str) -> dict[str, int]:
    """Observations a histogram made between two scrapes, per value of one of its labels: {value: count},
    only values that gained observations, ordered by value (numerically where the values are numbers)."""
    counts: dict[str, float] = {}
    for (sample, pairs), total in after.items():
        labels = dict(pairs)
        if sample != f"{name}_count" or label not in labels:
            continue
        gained = total - before.get((sample, pairs), 0.0)
        if gained > 0:
            counts[labels[label]] = counts.get(labels[label], 0.0) + gained
    order = lambda key: (0, int(key), key) if key.lstrip("-").isdigit() else (1, 0, key)
    return {key: int(round(counts[key])) for key in sorted(counts, key=order)}


UNET_ROWS = "triffusion_unet_batch_rows"  # histogram: rows per UNet call
UNET_CALL_SECONDS = "triffusion_unet_call_seconds"  # histograms labelled rows="N": time per UNet call


def unet_rows_between(before: dict, after: dict) -> dict:
    """What the UNet calls made between two scrapes carried, as the server measured it:
    calls and mean rows per call (triffusion_unet_batch_rows _count and _sum), and calls per row count
    (the rows labels of triffusion_unet_call_seconds). rows_per_call is None when no call was made."""
    calls = delta(before, after, f"{UNET_ROWS}_count")
    rows = delta(before, after, f"{UNET_ROWS}_sum")
    return {"unet_calls": int(round(calls)), "rows_per_call": round(rows / calls, 3) if calls > 0 else None,
            "calls_by_rows": counts_by_label(before, after, UNET_CALL_SECONDS, "rows")}
