"""The perf_analyzer SLO harness: parsing and SLO math on constructed data, clear errors, and a short
smoke run of the real perf_analyzer against the real server."""

import json

import pytest

from perf.perf_analyzer_slo import (HarnessError, check_server, input_data, parse_profile_export,
                                    run_rate, slo_summary)
from triffusion import contract


def test_profile_export_is_parsed_by_structure_even_with_raw_binary_outputs(tmp_path):
    raw = (b'{"experiments":[{"experiment":{"mode":"request_rate","value":2.0},"requests":['
           b'{"timestamp":1000000000,"response_timestamps":[1100000000,1250000000],'
           b'"response_outputs":[{"image":"\x86\x22\x5c\xff"}]},'
           b'{"timestamp":2000000000,"response_timestamps":[2400000000]}]},'
           b'{"experiment":{"mode":"request_rate","value":4.0},"requests":['
           b'{"timestamp":5000000000,"sequence_id":3,"response_timestamps":[5050000000]}]}],"version":"2.44.0"}')
    path = tmp_path / "export.json"
    path.write_bytes(raw)
    assert parse_profile_export(path) == {2.0: [250.0, 400.0], 4.0: [50.0]}


def test_malformed_export_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"not": "an export"}')
    with pytest.raises(HarnessError, match="not a perf_analyzer profile export"):
        parse_profile_export(path)


def test_slo_summary_counts_missing_responses_as_misses():
    summary = slo_summary([100, 200, 300, 5000], slo_ms=1000, duration_s=2.0, sent=5)
    assert summary["attainment"] == 0.6 and summary["goodput_rps"] == 1.5
    assert summary["p50_ms"] == 300 and summary["p99_ms"] == 5000


def test_input_data_names_every_orchestrator_input():
    data = input_data(["a", "b"], size=64, steps=3, slo_ms=1000)
    assert len(data["data"]) == 2
    assert set(data["data"][0]) == {spec.name for spec in contract.REQUEST_INPUTS}


def test_unreachable_server_and_unknown_model_are_one_line(server):
    with pytest.raises(HarnessError, match="cannot reach the server at localhost:1"):
        check_server("localhost:1", contract.TEXT_TO_IMAGE_STREAM)
    with pytest.raises(HarnessError, match="model 'nope' is not ready"):
        check_server(server.grpc, "nope")


def test_real_perf_analyzer_smoke(server, tmp_path, perf_analyzer):
    data = input_data([f"smoke {i}" for i in range(8)], size=64, steps=2, slo_ms=600_000)
    latencies, seconds = run_rate(server.grpc, 4.0, data, requests=4, workdir=tmp_path)
    assert len(latencies) >= 4 and all(0 < x < 60_000 for x in latencies) and seconds > 0
    summary = slo_summary(latencies, 60_000, seconds)
    assert summary["attainment"] == 1.0
    json.dumps(summary)
