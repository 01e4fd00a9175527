"""The overload generator: outcome and summary math on constructed records, and bursts, admission
rejections, timeouts and CLI errors against the real server (tiny preset, 64x64, few steps)."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf.overload import LoadResult, RequestRecord, burst_arrivals, reason_key, run_load
from perf.workloads import WorkloadError, poisson_arrivals
from triffusion import contract

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMISSION_REASONS = {"slo_infeasible", "would_break_admitted_slo", "queue_full"}


def _record(index, sent_s, slo_ms):
    return RequestRecord(index=index, arrival_s=sent_s, slo_ms=slo_ms, sent_s=sent_s)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "perf.overload", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------- pure: no server


def test_a_request_finishing_after_its_slo_is_late_not_ok():
    late, ok, no_slo = _record(0, 1.0, slo_ms=100), _record(1, 1.0, slo_ms=100), _record(2, 1.0, slo_ms=None)
    late.complete(1.15, {"slo_met": True, "steps_done": 10, "unet": "unet", "degraded_from_steps": None})
    ok.complete(1.05, {"slo_met": True, "steps_done": 8, "unet": "unet", "degraded_from_steps": 10})
    no_slo.complete(9.0, {"slo_met": None, "steps_done": 10, "unet": "unet"})
    # The client's clock decides: the server's slo_met is kept beside it, not trusted over it.
    assert (late.outcome, late.slo_met, round(late.latency_ms)) == ("late", True, 150)
    assert (ok.outcome, ok.steps_done, ok.degraded_from_steps) == ("ok", 8, 10)
    assert no_slo.outcome == "ok"


def test_failures_split_into_rejections_by_reason_and_errors():
    messages = {
        "UNAVAILABLE: queue is full (32 waiting); retry later": ("rejected", "queue_full"),
        "UNAVAILABLE: slo_ms 1 cannot be met at the current load: predicted 114 ms with 3 steps":
            ("rejected", "slo_infeasible"),
        "UNAVAILABLE: admitting it would make request 7f3a miss its SLO": ("rejected", "would_break_admitted_slo"),
        "UNAVAILABLE: draining for shutdown: 3 left": ("rejected", "draining for shutdown"),
        "INVALID_ARG: height: 65 is not allowed; allowed multiples of 16 in 64..512": ("error", "INVALID_ARG: height"),
        # A connection failure is UNAVAILABLE at the transport, not the server's admission: an error.
        "transport UNAVAILABLE: failed to connect to all addresses": ("error", "transport UNAVAILABLE"),
        "timeout: no final response within 2 s": ("error", "timeout"),
    }
    for message, expected in messages.items():
        record = _record(0, 0.0, slo_ms=1000)
        record.fail(0.01, message)
        assert (record.outcome, record.reason) == expected, message
        assert record.message == message
    assert reason_key("UNAVAILABLE: slo_ms 5 cannot be met") == reason_key("UNAVAILABLE: slo_ms 900 cannot be met")


def test_summary_counts_every_outcome_and_measures_only_what_met_its_slo():
    records = []
    for i, latency_s in enumerate([0.1, 0.2, 0.3]):  # ok
        records.append(_record(i, 0.0, slo_ms=500))
        records[-1].complete(latency_s, {})
    records.append(_record(3, 0.0, slo_ms=500))
    records[-1].complete(0.9, {"degraded_from_steps": 10})  # late
    for i, message in enumerate(["UNAVAILABLE: queue is full (32 waiting)", "UNAVAILABLE: slo_ms 500 cannot be met",
                                 "UNAVAILABLE: slo_ms 400 cannot be met"]):
        records.append(_record(4 + i, 0.0, slo_ms=500))
        records[-1].fail(0.001, message)
    records.append(_record(7, 0.0, slo_ms=500))
    records[-1].fail(0.001, "INVALID_ARG: steps: 0 is not allowed")
    summary = LoadResult(records, duration_s=2.0).summary()

    assert {k: summary[k] for k in ("sent", "accepted", "ok", "late", "rejected", "errors", "degraded")} == \
        {"sent": 8, "accepted": 4, "ok": 3, "late": 1, "rejected": 3, "errors": 1, "degraded": 1}
    assert summary["rejected_reasons"] == {"slo_infeasible": 2, "queue_full": 1}
    assert summary["error_reasons"] == {"INVALID_ARG: steps": 1}
    assert summary["attainment"] == 3 / 8 and summary["goodput_rps"] == 1.5
    # Percentiles over accepted requests only (ok and late), nearest rank.
    assert (summary["p50_ms"], summary["p99_ms"]) == (300.0, 900.0)
    json.dumps(summary)


def test_summary_refuses_a_record_that_never_ended():
    with pytest.raises(ValueError, match="outcome"):
        LoadResult([_record(0, 0.0, slo_ms=None)], duration_s=1.0).summary()


def test_burst_is_a_seeded_poisson_process_at_factor_times_capacity():
    assert burst_arrivals(4, 3, 10, seed=5) == poisson_arrivals(12, 10, seed=5)
    assert burst_arrivals(4, 3, 10, seed=5) != burst_arrivals(4, 3, 10, seed=6)
    with pytest.raises(WorkloadError, match="factor"):
        burst_arrivals(4, 0, 10, seed=0)


def test_run_load_checks_its_arguments_before_sending():
    with pytest.raises(ValueError, match="2 requests but 1 arrival"):
        asyncio.run(run_load("localhost:1", [{"prompt": "a"}, {"prompt": "b"}], [0.0]))
    with pytest.raises(ValueError, match=r"requests\[1\]: no prompt"):
        asyncio.run(run_load("localhost:1", [{"prompt": "a"}, {"steps": 2}], [0.0, 0.1]))


def test_cli_unreachable_server_is_one_error_line_and_exit_2():
    done = _cli("--url", "localhost:1", "--rate", "1", "--duration", "1")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: cannot reach the server at localhost:1" and done.stdout == ""


# ------------------------------------------------------------------------------------------ real server


def test_burst_far_beyond_capacity_rejects_some_serves_some_and_accounts_for_all(server):
    # Four slots serve roughly ten to thirty 30-step 64x64 requests a second here. About 150 arriving
    # within 0.4 s cannot all be taken: admission rejects what it predicts past the 3 s SLO and, should it
    # admit too many, the 4 slots + 32 queue places bound it. The first ones find the server idle and
    # finish in about a second even on a busy shared CPU, so some meet the SLO.
    arrivals = burst_arrivals(12, 32, 0.4, seed=0)
    requests = [{"prompt": f"burst {i}", "steps": 30, "seed": i, "slo_ms": 3000} for i in range(len(arrivals))]
    result = asyncio.run(run_load(server.grpc, requests, arrivals))
    summary = result.summary()
    print(json.dumps(summary))

    assert summary["sent"] == len(requests) >= 60
    assert summary["accepted"] + summary["rejected"] + summary["errors"] == summary["sent"]
    assert summary["errors"] == 0, summary["error_reasons"]
    assert summary["ok"] >= 1 and summary["rejected"] >= 1
    assert set(summary["rejected_reasons"]) <= ADMISSION_REASONS
    rejected = [r for r in result.records if r.outcome == "rejected"]
    assert all(r.message.startswith("UNAVAILABLE: ") for r in rejected)
    served = [r for r in result.records if r.outcome in ("ok", "late")]
    assert all(r.steps_done == 30 and r.unet == "unet" for r in served)
    # asyncio may wake a timer up to its clock resolution early: a millisecond of slack on the send time.
    for r in result.records:
        assert 0 <= r.arrival_s <= r.sent_s + 1e-3 and r.sent_s <= r.finished_s <= result.duration_s

    after = asyncio.run(run_load(server.grpc, [{"prompt": "after the burst", "steps": 3, "seed": 1}], [0.0]))
    assert (after.records[0].outcome, after.records[0].steps_done) == ("ok", 3)


@pytest.mark.parametrize("model", [contract.TEXT_TO_IMAGE_STREAM, contract.TEXT_TO_IMAGE])
def test_impossible_slo_is_rejected_at_admission_while_best_effort_succeeds(server, model):
    requests = [{"prompt": "impossible", "steps": 3, "slo_ms": 1}, {"prompt": "best effort", "steps": 3, "seed": 2},
                {"prompt": "bad", "height": 65}]
    records = asyncio.run(run_load(server.grpc, requests, [0.0, 0.0, 0.0], model=model)).records
    assert (records[0].outcome, records[0].reason) == ("rejected", "slo_infeasible")
    assert "slo_ms 1 cannot be met at the current load" in records[0].message
    assert (records[1].outcome, records[1].steps_done, records[1].slo_met) == ("ok", 3, None)
    assert (records[2].outcome, records[2].reason) == ("error", "INVALID_ARG: height")


def test_a_request_past_the_client_timeout_is_an_error_and_the_server_goes_on(server):
    # 100 steps take seconds on the tiny preset; the client gives up after 0.3 s and cancels the stream.
    slow = asyncio.run(run_load(server.grpc, [{"prompt": "slow", "steps": 100}], [0.0], timeout_s=0.3)).records[0]
    assert (slow.outcome, slow.reason) == ("error", "timeout")
    assert 0.3 <= slow.finished_s - slow.sent_s < 2.0
    after = asyncio.run(run_load(server.grpc, [{"prompt": "after", "steps": 2}], [0.0])).records[0]
    assert after.outcome == "ok"


def test_cli_runs_a_mix_and_writes_every_record(server, tmp_path):
    out = tmp_path / "overload.json"
    done = _cli("--url", server.grpc, "--rate", "4", "--duration", "1", "--mix", "tiny-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    report = json.loads(out.read_text())
    assert report["summary"] == summary and len(report["requests"]) == summary["sent"] >= 1
    assert summary["accepted"] + summary["rejected"] + summary["errors"] == summary["sent"]
    assert summary["errors"] == 0


def test_cli_unknown_model_and_misused_flags_are_one_error_line(server):
    done = _cli("--url", server.grpc, "--rate", "1", "--duration", "1", "--model", "nope")
    assert done.returncode == 2 and done.stderr.startswith("error: model 'nope' is not ready")
    assert len(done.stderr.strip().splitlines()) == 1
    done = _cli("--url", server.grpc, "--rate", "1", "--duration", "1", "--mix", "tiny-smoke", "--steps", "4")
    assert (done.returncode, done.stderr.strip()) == (2, "error: --steps does not apply with --mix (the mix sets it)")
