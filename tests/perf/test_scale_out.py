"""perf.scale_out's offline parts: the prediction error per measured point, and the cluster prediction with
and without the cascade split, on the simulator fed a small synthetic profile."""

import argparse

import pytest

from perf import scale_out

PROFILE = {"unet": [[m, s, s, r, t * (0.6 if m == "unet_lite" else 1.0) * (s / 64) ** 2 * (1 + 0.4 * r)]
                    for m in ("unet", "unet_lite") for s in (64, 128) for r in (1, 2, 4, 8, 16) for t in (0.004,)],
           "stages": [["encode", 1, 0.003], ["encode", 2, 0.004], ["decode", 4096, 0.004], ["decode", 16384, 0.01]]}
OPTION = {"threshold": 0.5, "steps": 20, "escalation": 0.3, "quality": 0.6, "light_s": 0.05, "heavy_s": 0.08}
PIPELINE = {"cascade": {"light": "unet_lite", "heavy": "unet", "threshold": 0.5, "options": [OPTION]},
            "registry": {}, "auto_stop": {}}
CLASSES = {"interactive": {"slo_ms": 1500, "priority": 2}, "standard": {"slo_ms": 4000, "priority": 1},
           "batch": {"slo_ms": 20000, "priority": 0}}


def test_errors_are_relative_to_the_measured_value_per_point():
    rows = [{"rate": 1.0, "attainment": 1.0, "goodput_rps": 2.0, "predicted": {"attainment": 0.9, "goodput_rps": 2.5}},
            {"rate": 2.0, "attainment": 0.0, "goodput_rps": 0.0, "predicted": {"attainment": 0.0, "goodput_rps": 0.1}},
            {"rate": 3.0, "attainment": 0.5, "goodput_rps": 1.0}]  # no prediction: left out
    out = scale_out.errors(rows)
    assert [e["rate"] for e in out] == [1.0, 2.0]
    assert out[0]["attainment"]["rel_error"] == 0.1 and out[0]["goodput_rps"]["rel_error"] == 0.25
    assert out[1]["attainment"]["rel_error"] == 0.0 and out[1]["goodput_rps"]["rel_error"] is None


def test_cluster_prediction_splits_heavy_gpus_off_only_where_there_are_several():
    args = argparse.Namespace(seed=0, sim_window_s=8.0, sim_escalation=0.3, min_window_s=8.0, min_requests=0)
    learned = {"unet": [], "stages": [], "iteration_scale": 1.0}
    out = scale_out.cluster_prediction(PIPELINE, PROFILE, learned, CLASSES, 3.0, [1, 4], args)
    one, four = out["1"], out["4"]
    assert one["rate"] == 3.0 and four["rate"] == 12.0
    assert "skipped" in one["escalation"]["split"]
    split = four["escalation"]["split"]
    assert split["light_gpus"] + split["heavy_gpus"] == 4 and split["heavy_gpus"] >= 1
    for row in (one["controller"]["in_place"], four["escalation"]["in_place"], split):
        assert 0.0 <= row["attainment"] <= 1.0 and row["goodput_rps"] >= 0.0
    assert four["escalation"]["in_place"]["goodput_rps"] > one["escalation"]["in_place"]["goodput_rps"]


def fake_server(limit):
    """Points that meet the target up to `limit` req/s; the rates run, in order."""
    ran = []

    def run(rate, index):
        ran.append(rate)
        return {"attainment": 1.0 if rate <= limit else 0.9}
    return run, ran


def test_a_sweep_goes_up_to_two_misses_and_down_when_it_starts_above_the_limit():
    from perf.slo_proof import crossing

    run, ran = fake_server(limit=10.0)
    rows, limit = crossing(run, start=4.0, step=2.0, max_rate=100)
    assert ran == [4.0, 8.0, 16.0, 32.0] and limit == 8.0 and len(rows) == 4
    # the 2-replica sweep starts at the 1-replica limit; a system below it is measured, not left without a limit
    run, ran = fake_server(limit=5.0)
    rows, limit = crossing(run, start=18.4, step=2.0, max_rate=100)
    assert ran == [18.4, 9.2, 4.6] and limit == 4.6
    run, ran = fake_server(limit=0.0)
    assert crossing(run, start=8.0, step=2.0, max_rate=100, down_steps=3) == ([{"attainment": 0.9}] * 4, None)


def test_set_items_become_checked_orchestrator_parameters():
    from perf.slo_proof import orchestrator_sets

    assert orchestrator_sets(["threads=1", "spinning=off", "admission_headroom=0.15"]) == {
        "threads": 1, "spinning": "off", "admission_headroom": 0.15}
    for bad, named in (("thread=1", "unknown orchestrator parameter"), ("threads=two", "threads: 'two'"),
                       ("spinning=maybe", "spinning: 'maybe'"), ("threads", "not KEY=VALUE")):
        with pytest.raises(ValueError, match=named):
            orchestrator_sets([bad])


def test_the_proof_reports_every_controller_decision_seen_during_its_points():
    from perf.slo_proof import ControllerWatch, summarize

    watch = ControllerWatch.__new__(ControllerWatch)  # the summary of samples, without a server to poll
    watch.samples = [(0.5, {"threshold": 0.58, "steps": 20, "demand_rps": 4.0, "expected_escalation": 0.75}),
                     (1.0, {"threshold": 0.58, "steps": 20, "demand_rps": 9.0, "expected_escalation": 0.75}),
                     (2.5, {"threshold": 0.56, "steps": 12, "demand_rps": 21.0, "expected_escalation": 0.25})]
    during = watch.summary()
    assert during["samples"] == 3
    assert [(d["threshold"], d["steps"], d["first_s"], d["samples"], d["demand_rps_max"]) for d in during["decisions"]] \
        == [(0.58, 20, 0.5, 2, 9.0), (0.56, 12, 2.5, 1, 21.0)]
    low = {"rate": 4.0, "attainment": 1.0, "goodput_rps": 4.0,
           "controller_during": {"decisions": during["decisions"][:1]}}
    high = {"rate": 21.0, "attainment": 1.0, "goodput_rps": 20.0, "controller_during": during}
    report = {"systems": {"full": {"sweep": [low, high]}}}
    controller = summarize(report, {"full": 21.0})["controller"]
    assert controller["changed_with_load"] is True
    assert [(d["threshold"], d["at_rates"]) for d in controller["decisions"]] == [(0.58, [4.0, 21.0]), (0.56, [21.0])]
    report["systems"]["full"]["sweep"] = [low]
    assert summarize(report, {"full": 4.0})["controller"]["changed_with_load"] is False


def test_the_calibration_rate_cannot_be_a_rate_the_sweep_predicts(tmp_path, capsys):
    from perf.slo_proof import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x.json"), "--start-rate", "2", "--step", "1.4", "--calibration-rate", "3.92"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--calibration-rate: 3.92 is not allowed; allowed a rate > 0 that the full system's sweep "
                        "does not run (it runs 3.92)") and "\n" not in err
    assert not (tmp_path / "x.json").exists()
