"""The benchmark report on constructed results: exact summary figures and ratios, the markdown table,
valid PNGs whose plotted data is the computed series, the benchmarks' own output shapes, and the
CLI's one-line errors. No server, no GPU."""

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from perf import report
from perf.perf_analyzer_slo import slo_summary
from perf.report import (ReportError, attainment_series, batch_series, cdf_series, load_results,
                         max_rate_at_target, pick_batch_rate, pick_cdf_rate, summarize, summary_line, write_report)

REPO = Path(__file__).resolve().parents[2]
SLO_MS = 5000

# {system: {rate: (attainment, goodput_rps, p99_ms)}}. Max rate at 99%: naive 1, request_batching 2,
# step_batching 4 (0.99 exactly counts). Highest common rate with each baseline: 4.
FIGURES = {
    "naive": {0.5: (1.0, 0.5, 3100.0), 1: (0.99, 0.99, 4900.0), 2: (0.6, 0.8, 9800.0), 4: (0.2, 0.5, 21000.0)},
    "request_batching": {0.5: (1.0, 0.5, 2600.0), 1: (1.0, 1.0, 3300.0), 2: (0.995, 1.99, 4800.0),
                         4: (0.7, 1.8, 8700.0)},
    "step_batching": {0.5: (1.0, 0.5, 1900.0), 1: (1.0, 1.0, 2100.0), 2: (1.0, 2.0, 2600.0),
                      4: (0.99, 3.96, 4700.0), 8: (0.5, 4.0, 9900.0)},
}
ROWS_PER_CALL = {"naive": (2,), "request_batching": (2, 4, 6, 8), "step_batching": (6, 8, 10, 12, 14, 16)}


def latencies(p99_ms: float, n: int, seed: int) -> list[float]:
    """A lognormal sample whose 99th percentile is near p99_ms."""
    rng, sigma = random.Random(seed), 0.35
    median = p99_ms / math.exp(2.326 * sigma)
    return [round(median * math.exp(rng.gauss(0, sigma)), 1) for _ in range(n)]


def batch_rows(system: str, seed: int, seconds: float = 60.0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(0.5 * i, 2), rng.choice(ROWS_PER_CALL[system])] for i in range(int(seconds / 0.5))]


def results(*, with_latencies: bool = True, with_batches: bool = True) -> dict:
    """Three systems; latencies at every rate; batch_rows at 4 req/s (all) and 8 (step_batching)."""
    systems = {}
    for s, (name, rates) in enumerate(FIGURES.items()):
        runs = {}
        for r, (rate, (attainment, goodput, p99)) in enumerate(rates.items()):
            run = {"attainment": attainment, "goodput_rps": goodput, "p50_ms": round(p99 / 2, 1),
                   "p90_ms": round(p99 * 0.8, 1), "p99_ms": p99}
            if with_latencies:
                run["latencies_ms"] = latencies(p99, 200, seed=10 * s + r)
            if with_batches and rate >= 4:
                run["batch_rows"] = batch_rows(name, seed=10 * s + r)
            runs[str(rate)] = run
        systems[name] = {"rates": runs}
    systems["naive"]["traces"] = {"bursty": {"attainment": 0.42, "goodput_rps": 0.31, "p99_ms": 18250.0}}
    systems["step_batching"]["traces"] = {"bursty": {"attainment": 0.97, "goodput_rps": 1.23, "p99_ms": 5400.0}}
    return {"bench": "perf_analyzer_slo", "device": "NVIDIA H100 80GB HBM3", "host": "gpu-host-1",
            "date": "2026-03-01", "slo_ms": SLO_MS, "systems": systems}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(results(), out)
    return out, path


def test_summary_json_has_exact_figures_max_rates_and_ratios(written):
    out, _ = written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "perf_analyzer_slo" and summary["device"] == "NVIDIA H100 80GB HBM3"
    assert {n: s["max_rate_at_99"] for n, s in summary["systems"].items()} == {
        "naive": 1.0, "request_batching": 2.0, "step_batching": 4.0}
    step = summary["systems"]["step_batching"]
    assert step["attainment"] == {"0.5": 1.0, "1": 1.0, "2": 1.0, "4": 0.99, "8": 0.5}
    assert step["p99_ms"] == {"0.5": 1900.0, "1": 2100.0, "2": 2600.0, "4": 4700.0, "8": 9900.0}
    assert step["goodput_rps"] == {"0.5": 0.5, "1": 1.0, "2": 2.0, "4": 3.96, "8": 4.0}
    assert step["traces"] == {"bursty": {"attainment": 0.97, "p99_ms": 5400.0, "goodput_rps": 1.23}}
    assert summary["candidate"] == "step_batching"
    assert summary["ratios"] == {
        "naive": {"max_rate_at_99": 4.0, "goodput": 7.92, "goodput_at_rate": 4.0},
        "request_batching": {"max_rate_at_99": 2.0, "goodput": 2.2, "goodput_at_rate": 4.0}}


def test_summary_line_names_each_baseline():
    summary = summarize(load_results(results()))
    assert summary_line(summary) == (
        "step_batching vs naive: 4.0x max load at 99% SLO, 7.9x goodput at 4 req/s; "
        "step_batching vs request_batching: 2.0x max load at 99% SLO, 2.2x goodput at 4 req/s")


def test_max_rate_is_the_highest_swept_rate_meeting_the_target():
    runs = lambda *a: {rate: {"attainment": x} for rate, x in a}
    assert max_rate_at_target(runs((1.0, 1.0), (2.0, 0.95), (3.0, 0.99), (4.0, 0.9899))) == 1.0
    assert max_rate_at_target(runs((1.0, 1.0), (2.0, 0.995), (3.0, 0.99), (4.0, 0.9899))) == 3.0
    assert max_rate_at_target(runs((1.0, 0.98))) is None
    assert max_rate_at_target({}) is None


def test_undefined_ratios_are_none_and_the_line_says_why():
    data = results(with_latencies=False, with_batches=False)
    for run in data["systems"]["naive"]["rates"].values():
        run["attainment"] = 0.5  # naive never meets 99%
    data["systems"]["request_batching"]["rates"] = {"16": {"attainment": 0.1, "goodput_rps": 1.0}}
    summary = summarize(load_results(data))
    assert summary["systems"]["naive"]["max_rate_at_99"] is None
    assert summary["ratios"]["naive"] == {"max_rate_at_99": None, "goodput": 7.92, "goodput_at_rate": 4.0}
    assert summary["ratios"]["request_batching"] == {"max_rate_at_99": None, "goodput": None,
                                                     "goodput_at_rate": None}
    assert summary_line(summary) == (
        "step_batching vs naive: max load at 99% SLO n/a (naive never met it), 7.9x goodput at 4 req/s; "
        "step_batching vs request_batching: max load at 99% SLO n/a (request_batching never met it), "
        "goodput n/a (no common rate)")


def test_markdown_table_has_every_cell_and_the_plots(written):
    out, path = written
    assert path == out / "report.md"
    text = path.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["load"] == ["naive", "request_batching", "step_batching"]
    assert rows["4 req/s"] == ["20% / 21,000 ms / 0.50 req/s", "70% / 8,700 ms / 1.80 req/s",
                               "99% / 4,700 ms / 3.96 req/s"]
    assert rows["2 req/s"][1] == "99.5% / 4,800 ms / 1.99 req/s"
    assert rows["8 req/s"] == ["—", "—", "50% / 9,900 ms / 4.00 req/s"]
    assert rows["trace `bursty`"] == ["42% / 18,250 ms / 0.31 req/s", "—", "97% / 5,400 ms / 1.23 req/s"]
    assert rows["**max load at 99%**"] == ["1 req/s", "2 req/s", "4 req/s"]
    assert [r for r in rows if r.endswith("req/s")] == ["0.5 req/s", "1 req/s", "2 req/s", "4 req/s", "8 req/s"]
    assert "device NVIDIA H100 80GB HBM3, host gpu-host-1, date 2026-03-01, SLO 5000 ms" in text
    for png in ("attainment_vs_load.png", "latency_cdf.png", "batch_size_over_time.png"):
        assert f"]({png})" in text
    assert "![Latency CDF at 4 req/s](latency_cdf.png)" in text
    assert "**step_batching vs naive: 4.0x max load" in text


@pytest.mark.parametrize("name", ["attainment_vs_load.png", "latency_cdf.png", "batch_size_over_time.png"])
def test_plots_are_valid_pngs_with_content(written, name):
    out, _ = written
    path = out / name
    assert path.stat().st_size > 20_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 500)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # lines, text and a legend, not a blank canvas


def test_attainment_plot_shows_each_system_and_the_target(tmp_path):
    data = load_results(results())
    series = attainment_series(data)
    assert series["naive"] == ([0.5, 1.0, 2.0, 4.0], [1.0, 0.99, 0.6, 0.2])
    assert series["step_batching"] == ([0.5, 1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 1.0, 0.99, 0.5])
    ax = report.plot_attainment(data, tmp_path / "a.png").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    labels = {"naive": "naive (99% up to 1 req/s)", "request_batching": "request_batching (99% up to 2 req/s)",
              "step_batching": "step_batching (99% up to 4 req/s)"}
    assert list(lines) == [*labels.values(), "99% target"]
    for name, (xs, ys) in series.items():
        assert list(lines[labels[name]].get_xdata()) == xs and list(lines[labels[name]].get_ydata()) == ys
    assert list(lines["99% target"].get_ydata()) == [0.99, 0.99] and lines["99% target"].get_linestyle() == "--"
    assert ax.get_xlabel() == "offered load (req/s)" and "attainment" in ax.get_ylabel()


def test_cdf_series_is_sorted_and_ends_at_one():
    xs, ys = cdf_series([300.0, 100.0, 200.0, 100.0])
    assert xs == [100.0, 100.0, 200.0, 300.0] and ys == [0.25, 0.5, 0.75, 1.0]
    xs, ys = cdf_series(latencies(4000, 200, seed=1))
    assert xs == sorted(xs) and ys == sorted(ys) and ys[-1] == 1.0 and len(xs) == len(ys) == 200


def test_cdf_plot_is_at_the_highest_rate_every_system_has_with_the_slo_line(tmp_path):
    data = load_results(results())
    assert pick_cdf_rate(data) == 4.0  # step_batching alone has 8
    ax = report.plot_cdf(data, 4.0, tmp_path / "c.png").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["naive", "request_batching", "step_batching", "SLO 5000 ms"]
    for name in FIGURES:
        xs, ys = cdf_series(data["systems"][name]["rates"][4.0]["latencies_ms"])
        assert list(lines[name].get_xdata()) == xs and list(lines[name].get_ydata()) == ys
    assert list(lines["SLO 5000 ms"].get_xdata()) == [SLO_MS, SLO_MS]
    assert "4 req/s" in ax.get_title() and ax.get_xlabel() == "end-to-end latency (ms)"
    assert pick_cdf_rate(load_results(results(with_latencies=False))) is None


def test_batch_plot_follows_the_cdf_rate_and_is_in_time_order(tmp_path):
    data = load_results(results())
    assert pick_batch_rate(data, prefer=4.0) == 4.0
    assert pick_batch_rate(data) == 8.0 and pick_batch_rate(data, prefer=2.0) == 8.0
    assert batch_series([[1.0, 4], [0.0, 2], [0.5, 8]]) == ([0.0, 0.5, 1.0], [2, 8, 4])
    ax = report.plot_batch(data, 4.0, tmp_path / "b.png").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["naive", "request_batching", "step_batching"]
    assert set(lines["naive"].get_ydata()) == {2}
    assert list(lines["step_batching"].get_xdata()) == [0.5 * i for i in range(120)]


def test_missing_batch_rows_and_latencies_skip_those_plots_and_say_so(tmp_path):
    path = write_report(results(with_latencies=False, with_batches=False), tmp_path)
    text = path.read_text()
    assert (tmp_path / "attainment_vs_load.png").exists()
    assert not (tmp_path / "latency_cdf.png").exists() and not (tmp_path / "batch_size_over_time.png").exists()
    assert "_Batch size over time: skipped, no system reported batch_rows_" in text
    assert "_Latency CDF: skipped, no rate at which every system reported latencies_ms_" in text


def test_slo_trace_output_is_accepted(tmp_path):
    """The shape perf/slo_trace.py writes: systems map rates straight to summarize() rows, no
    latencies, and max_load_at_99 is 0.0 where nothing met the target."""
    row = lambda a, g, p99: {"requests": 100, "attainment": a, "goodput_rps": g, "rejected": 0,
                             "p50_ms": p99 / 2, "p99_ms": p99, "mean_ms": p99 / 2}
    raw = {"bench": "slo_trace", "device": "NVIDIA H100 80GB HBM3", "preset": "sd15", "sizes": [512, 768],
           "steps": 50, "slo_ms": 5000, "duration_s": 60.0, "rates": [1.0, 2.0],
           "systems": {"naive": {"1.0": row(0.5, 0.5, 9000.0), "2.0": row(0.2, 0.4, 20000.0)},
                       "step_batching": {"1.0": row(1.0, 1.0, 2000.0), "2.0": row(0.995, 1.99, 4000.0)}},
           "max_load_at_99": {"naive": 0.0, "step_batching": 2.0}}
    write_report(raw, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["systems"]["naive"]["max_rate_at_99"] is None
    assert summary["systems"]["step_batching"]["attainment"] == {"1": 1.0, "2": 0.995}
    assert summary["ratios"]["naive"] == {"max_rate_at_99": None, "goodput": 4.975, "goodput_at_rate": 2.0}
    with pytest.raises(ReportError, match=r'^systems\["naive"\]\["fast"\]: rate is not a number'):
        load_results({**raw, "systems": {"naive": {"fast": row(1.0, 1.0, 1.0)}}})


def test_perf_analyzer_output_is_one_system(tmp_path):
    """The shape perf/perf_analyzer_slo.py writes: one system's rates at the top level."""
    raw = {"bench": "perf_analyzer_slo", "slo_ms": 2000,
           "rates": {"1.0": slo_summary([100, 200, 300], 2000, 3.0), "2.0": slo_summary([100, 5000], 2000, 1.0)}}
    write_report(raw, tmp_path, system="orchestrator", candidate="orchestrator")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["systems"]["orchestrator"]["max_rate_at_99"] == 1.0 and summary["ratios"] == {}
    assert summary_line(summary) == "orchestrator: max load at 99% SLO 1 req/s (no baseline to compare)"


def test_candidate_named_in_the_results_is_used_unless_overridden(tmp_path):
    data = results(with_latencies=False, with_batches=False)
    data["systems"] = {"orchestrator": data["systems"]["step_batching"], "baseline": data["systems"]["naive"]}
    data["candidate"] = "orchestrator"
    assert summarize(load_results(data))["ratios"] == {
        "baseline": {"max_rate_at_99": 4.0, "goodput": 7.92, "goodput_at_rate": 4.0}}
    assert summarize(load_results(data), "baseline")["ratios"] == {
        "orchestrator": {"max_rate_at_99": 0.25, "goodput": 0.126, "goodput_at_rate": 4.0}}


def test_unknown_candidate_is_an_error(tmp_path):
    with pytest.raises(ReportError, match=r"^candidate: 'nope' is not one of the systems \(naive, "):
        write_report(results(with_latencies=False), tmp_path, candidate="nope")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "perf.report", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_writes_the_report_and_prints_the_ratios_last(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results()))
    done = cli(src, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == summary_line(json.loads((tmp_path / "out" / "summary.json").read_text()))
    assert done.stdout.strip().splitlines()[-1].startswith("step_batching vs naive: 4.0x max load")


def _without_systems(d):
    del d["systems"]


def _bad_rate(d):
    d["systems"]["naive"]["rates"]["fast"] = d["systems"]["naive"]["rates"].pop("1")


def _bad_attainment(d):
    d["systems"]["request_batching"]["rates"]["2"]["attainment"] = 1.5


def _missing_goodput(d):
    del d["systems"]["step_batching"]["traces"]["bursty"]["goodput_rps"]


@pytest.mark.parametrize("break_it, line", [
    (_without_systems, "error: systems: missing"),
    (_bad_rate, 'error: systems["naive"]["rates"]["fast"]: rate is not a number'),
    (_bad_attainment, 'error: systems["request_batching"]["rates"]["2"]["attainment"]: 1.5 is outside 0..1'),
    (_missing_goodput, 'error: systems["step_batching"]["traces"]["bursty"]["goodput_rps"]: missing'),
])
def test_cli_malformed_results_are_one_error_line_and_exit_2(tmp_path, break_it, line):
    data = copy.deepcopy(results(with_latencies=False, with_batches=False))
    break_it(data)
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data))
    done = cli(src, "--out", tmp_path / "out")
    assert (done.returncode, done.stderr.strip().splitlines(), done.stdout) == (2, [line], "")
    assert not (tmp_path / "out").exists()


def test_cli_unreadable_file_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = cli(bad, "--out", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.startswith(f"error: {bad}: cannot read as JSON")
    assert len(done.stderr.strip().splitlines()) == 1
