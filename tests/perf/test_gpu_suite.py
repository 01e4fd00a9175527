"""The GPU suite's CPU dry run: `DEVICE=cpu bash perf/gpu_suite.sh`, the same script and steps a GPU host
runs, on the tiny preset, so that the suite cannot rot between GPU runs. The summary JSON has the shape
the GPU acceptance reads (device "cpu"), and every step's own JSON is there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf.gpu_suite import STEPS, machine_tag, summary_line
from perf.slo_bench import SYSTEMS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.server
def test_cpu_dry_run_writes_every_json_and_the_summary(tmp_path, perf_analyzer):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable}
    suite = subprocess.Popen(["bash", str(ROOT / "perf" / "gpu_suite.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = suite.communicate(timeout=1000)
    except subprocess.TimeoutExpired:
        suite.terminate()  # the suite stops its running step (and that step's servers) on SIGTERM
        output, _ = suite.communicate(timeout=120)
    logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("gpu_suite_cpu_logs/*.log")))
    assert suite.returncode == 0, output[-3000:] + logs
    last = output.strip().splitlines()[-1]
    assert last.startswith("gpu_suite cpu: server/in-process b2 ") and "4/4 steps ok" in last
    report = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert report["bench"] == "gpu_suite" and report["device"] == "cpu"
    unet = report["unet_serving"]
    assert set(unet["server_step_ms"]) == set(unet["inprocess_step_ms"]) == {"2", "4"}
    assert all(v > 0 for v in unet["inprocess_step_ms"].values()) and unet["e2e_s"] > 0
    assert "e2e_50step_512_s" in unet and unet["e2e_50step_512_s"] is None  # a GPU-size figure only
    assert isinstance(report["orchestration_overhead_pct"], (int, float))
    assert set(report["slo_bench"]["max_rate_at_99"]) == set(SYSTEMS)  # the orchestrator's front and both baselines
    assert set(report["quality_aware"]["goodput_at_99"]) == {"fixed_50", "auto_cascade"}
    assert {name: step["status"] for name, step in report["steps"].items()} == {name: "ok" for name in STEPS}
    for name in ("unet_serving_cpu.json", "orchestration_overhead_cpu.json", "quality_aware_cpu.json"):
        assert json.loads((tmp_path / name).read_text())["bench"] in name
    assert list((tmp_path / "slo_bench_cpu").glob("*/results.json"))
    assert "acceptance" not in report  # the GPU acceptance is not judged on a CPU


def test_a_missing_bundle_is_named_with_how_to_build_it(tmp_path):
    bare = tmp_path / "python3"  # an interpreter that cannot import the project
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    env = {**os.environ, "PYTHON": str(bare), "BUNDLE": str(tmp_path / "none")}
    done = subprocess.run(["bash", str(ROOT / "perf" / "gpu_suite.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "bash perf/gpu_bundle.sh" in done.stderr


def test_the_summary_line_names_failed_steps_and_the_file():
    report = {"device": "cuda:NVIDIA H200", "wall_s": 470.2, "orchestration_overhead_pct": None, "slo_bench": None,
              "quality_aware": None,
              "unet_serving": {"server_over_inprocess": {"2": 1.04, "8": 1.01, "16": None}, "e2e_50step_512_s": 0.62,
                               "steps": 50, "size": 512},
              "steps": {"unet_serving": {"status": "ok"}, "orchestration_overhead": {"status": "failed"}}}
    line = summary_line(report, Path("perf/results/gpu_suite_h200.json"))
    assert line == ("gpu_suite cuda:NVIDIA H200: server/in-process b2 1.04x b8 1.01x b16 n/a; e2e 50-step 512px "
                    "0.620 s; 1/2 steps ok (orchestration_overhead failed) in 470 s -> perf/results/gpu_suite_h200.json")
    assert machine_tag("cpu") == "cpu"


def test_steps_time_out_retry_and_skip_within_the_budget(tmp_path):
    import time

    from perf.gpu_suite import Step, run_step

    flaky = [sys.executable, "-c", f"import pathlib, sys; p = pathlib.Path({str(tmp_path / 'once')!r}); "
                                   "sys.exit(0 if p.exists() else p.touch() or 1)"]
    result = run_step(Step("slo_bench", [flaky], limit_s=30, attempts=2), time.monotonic() + 60, 1, tmp_path)
    assert result["status"] == "ok" and result["attempts"] == 2
    started = time.monotonic()
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    result = run_step(Step("unet_serving", [slow], limit_s=2), time.monotonic() + 60, 1, tmp_path)
    assert result["status"] == "failed" and "timed out" in result["reason"] and time.monotonic() - started < 30
    result = run_step(Step("quality_aware", [slow], limit_s=30), time.monotonic() + 5, 10, tmp_path)
    assert result["status"] == "skipped" and "budget" in result["reason"]
