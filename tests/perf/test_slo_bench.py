"""The SLO benchmark end to end on the tiny preset: real perf_analyzer against the orchestrator and
both baselines of the real server, a Poisson rate and a bursty trace, then the report."""

import json
import subprocess
import sys

import pytest

from perf.perf_analyzer_slo import HarnessError
from perf.slo_bench import parse_trace, run


def test_three_systems_side_by_side_on_a_rate_and_a_trace(server, tmp_path, perf_analyzer):
    results = run(server.grpc, server.metrics, systems=["text_to_image_stream", "baseline_batching", "baseline_sequential"],
                  mix="tiny-smoke", rates=[2.0], traces=["gamma:2:3:6"], slo_ms=60_000, requests=4,
                  workdir=tmp_path, log=lambda *_: None)
    for system, row in results.items():
        for run_ in (row["rates"]["2.0"], row["traces"]["gamma:2:3:6"]):
            assert len(run_["latencies_ms"]) >= 4 and all(0 < x < 60_000 for x in run_["latencies_ms"]), system
            assert run_["attainment"] == 1.0 and run_["p99_ms"] >= run_["p50_ms"] > 0
    # The orchestrator's UNet rows per call come from /metrics: at least one sample, at least 1 row.
    samples = results["text_to_image_stream"]["rates"]["2.0"]["batch_rows"] + results["text_to_image_stream"]["traces"]["gamma:2:3:6"]["batch_rows"]
    assert samples and all(rows >= 1 for _, rows in samples)
    # Per-stage server times: the orchestrator's histograms, Triton's statistics for the baselines.
    stages = results["text_to_image_stream"]["rates"]["2.0"]["server_stage_ms"]
    assert set(stages) == {"queue", "encode", "unet", "decode", "total"} and stages["total"] >= stages["decode"] > 0
    for baseline in ("baseline_batching", "baseline_sequential"):
        stages = results[baseline]["rates"]["2.0"]["server_stage_ms"]
        assert stages["total"] >= stages["compute_infer"] > 0 and stages["queue"] >= 0
    json.dumps(results)


def test_bad_trace_spec_and_unknown_system_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match="--traces: 'maf:x:3' is not maf:RATE:DURATION"):
        parse_trace("maf:x:3")
    done = subprocess.run([sys.executable, "-m", "perf.slo_bench", "--url", "localhost:1", "--systems", "nope"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--systems: unknown nope" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_server_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "perf.slo_bench", "--url", "localhost:1", "--rates", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "error: cannot reach the server at localhost:1" in done.stderr
    assert "Traceback" not in done.stderr


def test_malformed_trace_file_is_one_line_naming_file_and_line(tmp_path):
    trace = tmp_path / "recorded.txt"
    trace.write_text("1000\n250000\nsoon\n")
    done = subprocess.run([sys.executable, "-m", "perf.slo_bench", "--url", "localhost:1", "--traces", f"file:{trace}",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{trace}:3" in done.stderr and done.stderr.strip().count("\n") == 0
