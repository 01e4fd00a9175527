"""Benchmark report: summary.json, report.md and PNG plots from one SLO results file.

Reads what the SLO benchmarks write and compares the candidate system (this project's step batching)
with each baseline: the highest offered load that kept 99% SLO attainment, and goodput at the highest
rate both were run at.

    python -m perf.report perf/results/slo_trace_h100.json --out perf/results/<host>-<date>/

Accepted inputs (`load_results` turns each into one canonical form):
  {"bench": ..., "slo_ms": N, "systems": {name: {"rates": {rate: run}, "traces": {trace: run}}}}
  perf/slo_trace.py:        {"bench": "slo_trace", "slo_ms": N, "systems": {name: {rate: run}}, ...}
  perf/perf_analyzer_slo.py: {"bench": "perf_analyzer_slo", "slo_ms": N, "rates": {rate: run}} (one system)
where a run is {"attainment", "goodput_rps", optional "p50_ms"/"p90_ms"/"p99_ms", "latencies_ms",
"batch_rows": [[t_seconds, rows], ...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

CANDIDATE = "step_batching"
TARGET = 0.99  # the SLO attainment that defines "max load"
PLOTS = {"attainment": "attainment_vs_load.png", "cdf": "latency_cdf.png", "batch": "batch_size_over_time.png"}


class ReportError(ValueError):
    """Malformed results; the message starts with the offending key."""


# 1. Input: validation and the adapters for each benchmark's output


def _key(*parts: str) -> str:
    head, *rest = parts
    return head + "".join(f"[{json.dumps(p)}]" for p in rest)


def _number(value, where: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReportError(f"{where}: {value!r} is not a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
        raise ReportError(f"{where}: {value!r} is outside {span}")
    return float(value)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _rate(key: str, where: str) -> float:
    try:
        rate = float(key)
    except ValueError:
        raise ReportError(f"{where}: rate is not a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ReportError(f"{where}: rate must be a positive number")
    return rate


def _run(run, where: str) -> dict:
    """One measured run, checked field by field; unknown fields are kept as they are."""
    run = dict(_mapping(run, where))
    for name in ("attainment", "goodput_rps"):
        if name not in run:
            raise ReportError(f"{where}[{json.dumps(name)}]: missing")
    run["attainment"] = _number(run["attainment"], f"{where}[\"attainment\"]", lo=0.0, hi=1.0)
    run["goodput_rps"] = _number(run["goodput_rps"], f"{where}[\"goodput_rps\"]", lo=0.0)
    for name in ("p50_ms", "p90_ms", "p99_ms"):
        if run.get(name) is not None:  # None: no request completed
            run[name] = _number(run[name], f"{where}[{json.dumps(name)}]", lo=0.0)
    if "latencies_ms" in run:
        values = run["latencies_ms"]
        if not isinstance(values, list):
            raise ReportError(f"{where}[\"latencies_ms\"]: expected a list")
        run["latencies_ms"] = [_number(x, f"{where}[\"latencies_ms\"][{i}]", lo=0.0) for i, x in enumerate(values)]
    if "batch_rows" in run:
        rows = run["batch_rows"]
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
            raise ReportError(f"{where}[\"batch_rows\"]: expected a list of [t_seconds, rows] pairs")
        run["batch_rows"] = [(_number(t, f"{where}[\"batch_rows\"][{i}][0]"),
                              _number(n, f"{where}[\"batch_rows\"][{i}][1]", lo=0.0)) for i, (t, n) in enumerate(rows)]
    return run


def _rates(rates, where: str) -> dict[float, dict]:
    """{rate string: run} -> {rate: run}, sorted by rate; "1" and "1.0" in one system is an error."""
    out: dict[float, dict] = {}
    for key, run in _mapping(rates, where).items():
        rate = _rate(key, _key(where, key))
        if rate in out:
            raise ReportError(f"{_key(where, key)}: rate {rate:g} appears twice")
        out[rate] = _run(run, _key(where, key))
    return dict(sorted(out.items()))


def load_results(raw: dict, *, system: str = CANDIDATE) -> dict:
    """The canonical results from any accepted input: {"bench", "device", "host", "date", "slo_ms",
    "candidate", "systems": {name: {"rates": {float rate: run}, "traces": {name: run}}}}.

    `system` names the one system of a perf_analyzer_slo.py file. slo_trace.py's "max_load_at_99"
    is not read: the report recomputes it, with None (not 0.0) where no rate met the target."""
    raw = _mapping(raw, "results")
    if "systems" in raw:
        systems = _mapping(raw["systems"], "systems")
    elif isinstance(raw.get("rates"), dict):  # perf_analyzer_slo.py: one system, rates at the top
        systems = {system: {"rates": raw["rates"]}}
    else:
        raise ReportError("systems: missing")
    if not systems:
        raise ReportError("systems: empty")
    if "slo_ms" not in raw:
        raise ReportError("slo_ms: missing")
    if raw.get("candidate") is not None and not isinstance(raw["candidate"], str):
        raise ReportError(f"candidate: {raw['candidate']!r} is not a system name")
    out = {"bench": raw.get("bench"), "device": raw.get("device"), "host": raw.get("host"), "date": raw.get("date"),
           "slo_ms": _number(raw["slo_ms"], "slo_ms", lo=0.0), "candidate": raw.get("candidate"), "systems": {}}
    for name, entry in systems.items():
        where = _key("systems", name)
        entry = _mapping(entry, where)
        if raw.get("bench") == "slo_trace":  # slo_trace.py: {name: {rate: run}}
            rates, traces, rates_where = entry, {}, where
        else:
            if "rates" not in entry and "traces" not in entry:
                raise ReportError(f"{_key('systems', name, 'rates')}: missing")
            rates, traces, rates_where = entry.get("rates", {}), entry.get("traces", {}), _key("systems", name, "rates")
        out["systems"][name] = {
            "rates": _rates(rates, rates_where),
            "traces": {t: _run(run, _key("systems", name, "traces", t))
                       for t, run in _mapping(traces, _key("systems", name, "traces")).items()}}
    return out


# 2. Figures: the numbers the summary and the plots show


def rate_key(rate: float) -> str:
    """The one spelling of a rate in summary.json and report.md: 1.0 -> "1", 0.25 -> "0.25"."""
    return f"{rate:g}"


def max_rate_at_target(rates: dict[float, dict], target: float = TARGET) -> float | None:
    """The highest swept rate up to which every swept rate met the target (a load the system sustains;
    a lucky rate past a failing one does not count), or None if the lowest one failed."""
    best = None
    for rate in sorted(rates):
        if rates[rate]["attainment"] < target:
            break
        best = rate
    return best


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(results: dict, candidate: str = CANDIDATE, target: float = TARGET) -> dict:
    """{baseline: {"max_rate_at_99", "goodput", "goodput_at_rate"}}: candidate / baseline ratios, None
    where undefined (a side never met the target, no common rate, zero baseline goodput)."""
    systems = results["systems"]
    mine = systems[candidate]["rates"]
    ratios = {}
    for name, other in systems.items():
        if name == candidate:
            continue
        common = sorted(set(mine) & set(other["rates"]))
        at = common[-1] if common else None
        ratios[name] = {
            "max_rate_at_99": _ratio(max_rate_at_target(mine, target), max_rate_at_target(other["rates"], target)),
            "goodput": _ratio(mine[at]["goodput_rps"], other["rates"][at]["goodput_rps"]) if at is not None else None,
            "goodput_at_rate": at}
    return ratios


def summarize(results: dict, candidate: str | None = None, target: float = TARGET) -> dict:
    """The summary.json content: per-system figures by rate and the candidate's ratios. The candidate
    is the one named here, else the one the results name, else CANDIDATE."""
    candidate = candidate or results.get("candidate") or CANDIDATE
    if candidate not in results["systems"]:
        raise ReportError(f"candidate: {candidate!r} is not one of the systems ({', '.join(results['systems'])})")
    systems = {}
    for name, entry in results["systems"].items():
        rates = entry["rates"]
        systems[name] = {
            "attainment": {rate_key(r): run["attainment"] for r, run in rates.items()},
            "p99_ms": {rate_key(r): run.get("p99_ms") for r, run in rates.items()},
            "goodput_rps": {rate_key(r): run["goodput_rps"] for r, run in rates.items()},
            "max_rate_at_99": max_rate_at_target(rates, target),
            "traces": {t: {k: run.get(k) for k in ("attainment", "p99_ms", "goodput_rps")}
                       for t, run in entry["traces"].items()}}
    return {"bench": results["bench"], "device": results["device"], "host": results["host"],
            "date": results["date"], "slo_ms": results["slo_ms"], "target": target, "candidate": candidate,
            "systems": systems, "ratios": compare(results, candidate, target)}


def summary_line(summary: dict) -> str:
    """One line of the candidate's ratios against each baseline."""
    me, target = summary["candidate"], f"{summary.get('target', TARGET):.0%}"
    if not summary["ratios"]:
        best = summary["systems"][me]["max_rate_at_99"]
        load = f"{rate_key(best)} req/s" if best is not None else "never met"
        return f"{me}: max load at {target} SLO {load} (no baseline to compare)"
    parts = []
    for name, r in summary["ratios"].items():
        if r["max_rate_at_99"] is not None:
            load = f"{r['max_rate_at_99']:.1f}x max load at {target} SLO"
        else:
            never = [s for s in (me, name) if summary["systems"][s]["max_rate_at_99"] is None]
            load = f"max load at {target} SLO n/a ({' and '.join(never)} never met it)"
        if r["goodput"] is not None:
            good = f"{r['goodput']:.1f}x goodput at {rate_key(r['goodput_at_rate'])} req/s"
        elif r["goodput_at_rate"] is None:
            good = "goodput n/a (no common rate)"
        else:
            good = f"goodput n/a ({name} had none at {rate_key(r['goodput_at_rate'])} req/s)"
        parts.append(f"{me} vs {name}: {load}, {good}")
    return "; ".join(parts)


def attainment_series(results: dict) -> dict[str, tuple[list[float], list[float]]]:
    """{system: (rates, attainments)}, rates ascending."""
    return {name: (list(e["rates"]), [run["attainment"] for run in e["rates"].values()])
            for name, e in results["systems"].items()}


def cdf_series(latencies_ms: list[float]) -> tuple[list[float], list[float]]:
    """Empirical CDF of completed requests: sorted latencies and the fraction at or below each."""
    xs = sorted(latencies_ms)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def batch_series(batch_rows: list) -> tuple[list[float], list[float]]:
    """(times, rows) in time order."""
    pairs = sorted(batch_rows)
    return [t for t, _ in pairs], [n for _, n in pairs]


def pick_cdf_rate(results: dict) -> float | None:
    """The highest rate at which every system has latencies, or None."""
    have = [{r for r, run in e["rates"].items() if run.get("latencies_ms")} for e in results["systems"].values()]
    common = set.intersection(*have) if have else set()
    return max(common) if common else None


def pick_batch_rate(results: dict, prefer: float | None = None) -> float | None:
    """`prefer` (the CDF's rate, so the two plots show one run) if any system has batch_rows there,
    else the highest rate at which any system has them, else None."""
    rates = {r for e in results["systems"].values() for r, run in e["rates"].items() if run.get("batch_rows")}
    return prefer if prefer in rates else max(rates, default=None)


# 3. Plots


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _context(results: dict) -> str:
    return ", ".join(x for x in (results["device"], f"SLO {results['slo_ms']:g} ms") if x)


def plot_attainment(results: dict, path: Path, target: float = TARGET) -> Figure:
    """One line per system and the target as a dashed line; the figure is returned for inspection."""
    fig, ax = _figure(f"SLO attainment vs offered load ({_context(results)})", "offered load (req/s)",
                      "SLO attainment (requests within SLO)")
    for name, (rates, attainment) in attainment_series(results).items():
        best = max_rate_at_target(results["systems"][name]["rates"], target)
        reach = f"{rate_key(best)} req/s" if best is not None else "never"
        ax.plot(rates, attainment, marker="o", label=f"{name} ({target:.0%} up to {reach})")
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.legend(loc="lower left")
    fig.savefig(path)
    return fig


def plot_cdf(results: dict, rate: float, path: Path) -> Figure:
    """Each system's latency CDF at one rate, with the SLO as a vertical line."""
    fig, ax = _figure(f"Latency CDF at {rate_key(rate)} req/s ({_context(results)})", "end-to-end latency (ms)",
                      "fraction of completed requests")
    for name, entry in results["systems"].items():
        run = entry["rates"].get(rate)
        if run and run.get("latencies_ms"):
            ax.plot(*cdf_series(run["latencies_ms"]), drawstyle="steps-post", label=name)
    ax.axvline(results["slo_ms"], color="red", linestyle=":", label=f"SLO {results['slo_ms']:g} ms")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.legend(loc="lower right")
    fig.savefig(path)
    return fig


def plot_batch(results: dict, rate: float, path: Path) -> Figure:
    """Rows per UNet call over the run at one rate, for each system that reported batch_rows."""
    fig, ax = _figure(f"UNet batch size over time at {rate_key(rate)} req/s ({_context(results)})",
                      "time since trace start (s)", "batch rows per UNet call")
    for name, entry in results["systems"].items():
        run = entry["rates"].get(rate)
        if run and run.get("batch_rows"):
            ax.plot(*batch_series(run["batch_rows"]), drawstyle="steps-post", label=name)
    # Headroom above the largest batch keeps the one-row legend off the lines.
    ax.set_ylim(0, 1.25 * max([n for line in ax.get_lines() for n in line.get_ydata()], default=1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", ncols=max(len(ax.get_lines()), 1))
    fig.savefig(path)
    return fig


# 4. The report


def _cell(run: dict | None) -> str:
    if run is None:
        return "—"
    p99 = f"{run['p99_ms']:,.0f} ms" if run.get("p99_ms") is not None else "no p99"
    return f"{100 * run['attainment']:.4g}% / {p99} / {run['goodput_rps']:.2f} req/s"


def markdown(results: dict, summary: dict, plots: dict[str, str]) -> str:
    """report.md: header, the table (rows: rates then traces; cells: attainment / p99 / goodput), plots."""
    names = list(results["systems"])
    target = f"{summary['target']:.0%}"
    facts = [f"{k} {results[k]}" for k in ("device", "host", "date") if results[k]]
    lines = [f"# {results['bench'] or 'SLO benchmark'} report", "",
             ", ".join(facts + [f"SLO {results['slo_ms']:g} ms", f"target {target} attainment"]) + ".", "",
             "Each cell: SLO attainment / p99 latency / goodput (requests/s that met the SLO).", "",
             "| load | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rates = sorted({r for e in results["systems"].values() for r in e["rates"]})
    for rate in rates:
        cells = [_cell(results["systems"][n]["rates"].get(rate)) for n in names]
        lines.append(f"| {rate_key(rate)} req/s | " + " | ".join(cells) + " |")
    traces = list(dict.fromkeys(t for e in results["systems"].values() for t in e["traces"]))
    for trace in traces:
        cells = [_cell(results["systems"][n]["traces"].get(trace)) for n in names]
        lines.append(f"| trace `{trace}` | " + " | ".join(cells) + " |")
    best = [summary["systems"][n]["max_rate_at_99"] for n in names]
    lines.append(f"| **max load at {target}** | "
                 + " | ".join(f"{rate_key(b)} req/s" if b is not None else "never met" for b in best) + " |")
    lines += ["", f"**{summary_line(summary)}**", "", "## Plots", ""]
    for title, file in plots.items():
        lines += [f"![{title}]({file})" if file.endswith(".png") else f"_{title}: {file}_", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path | str, *, candidate: str | None = None,
                 cdf_rate: float | None = None, system: str = CANDIDATE) -> Path:
    """Write summary.json, report.md and the PNG plots into out_dir; returns report.md's path.

    `candidate` defaults to the results' own "candidate", else CANDIDATE; `cdf_rate` picks the latency
    CDF's rate (default: the highest rate where every system has latencies); `system` names the one
    system of a perf_analyzer_slo.py file."""
    # 1. Check inputs
    results = load_results(results, system=system)
    summary = summarize(results, candidate)
    if cdf_rate is None:
        cdf_rate = pick_cdf_rate(results)
    elif not any(e["rates"].get(float(cdf_rate), {}).get("latencies_ms") for e in results["systems"].values()):
        raise ReportError(f"cdf_rate: no system has latencies_ms at {rate_key(float(cdf_rate))} req/s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 2. Plots; a skipped one is named in the report with the reason
    plots = {"SLO attainment vs offered load": PLOTS["attainment"]}
    plot_attainment(results, out / PLOTS["attainment"])
    if cdf_rate is not None:
        plot_cdf(results, float(cdf_rate), out / PLOTS["cdf"])
        plots[f"Latency CDF at {rate_key(float(cdf_rate))} req/s"] = PLOTS["cdf"]
    else:
        plots["Latency CDF"] = "skipped, no rate at which every system reported latencies_ms"
    batch_rate = pick_batch_rate(results, prefer=None if cdf_rate is None else float(cdf_rate))
    if batch_rate is not None:
        plot_batch(results, batch_rate, out / PLOTS["batch"])
        plots[f"Batch size over time at {rate_key(batch_rate)} req/s"] = PLOTS["batch"]
    else:
        plots["Batch size over time"] = "skipped, no system reported batch_rows"

    # 3. summary.json and report.md
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(markdown(results, summary, plots).rstrip() + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results JSON written by a benchmark")
    ap.add_argument("--out", type=Path, required=True, help="report folder, e.g. perf/results/<host>-<date>/")
    ap.add_argument("--candidate", help=f"the system compared with every other (default: the results' "
                    f"\"candidate\", else {CANDIDATE})")
    ap.add_argument("--system", default=CANDIDATE, help="name of the one system in a perf_analyzer_slo.py file")
    ap.add_argument("--cdf-rate", type=float, help="rate for the latency CDF (default: highest common rate)")
    args = ap.parse_args(argv)
    try:
        try:
            raw = json.loads(args.results.read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"{args.results}: cannot read as JSON ({exc})") from None
        report = write_report(raw, args.out, candidate=args.candidate, cdf_rate=args.cdf_rate, system=args.system)
    except ReportError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        sys.exit(2)
    print(f"wrote {report}")
    print(summary_line(json.loads((args.out / "summary.json").read_text())))


if __name__ == "__main__":
    main()
