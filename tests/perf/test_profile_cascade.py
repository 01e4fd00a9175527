"""perf.profile_cascade: operating points from gate scores (arithmetic, validation, writing), and the
command on a tiny cascade repository served by the real server."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perf.profile_cascade import (ProfileError, _parse, controller_blocked, escalation_thresholds, operating_points,
                                  profile_seconds, request_names, write_options)
from triffusion.orchestrator.config import OrchestratorConfig, cascade_of
from triffusion.orchestrator.predictor import LatencyPredictor
from triffusion.orchestrator.registry import _check_options, parse_registry

REPO = Path(__file__).resolve().parents[2]


def registry_with(options):
    """The options as a registry family's cascade.options, through the registry's own parser."""
    return parse_registry({"families": {"tiny": {
        "variants": {"heavy": {"preset": "tiny"}, "light": {"preset": "tiny-lite"}},
        "cascade": {"light": "light", "heavy": "heavy", "threshold": 0.5, "options": options}}}})


def assert_monotone_escalation(options):
    for steps in {o["steps"] for o in options}:
        points = sorted((o["threshold"], o["escalation"]) for o in options if o["steps"] == steps)
        assert [e for _, e in points] == sorted(e for _, e in points), points


# ------------------------------------------------------------------------------------------ the numbers


def test_operating_points_escalate_below_the_threshold_and_return_the_cascades_answer():
    light = {10: np.array([0.2, 0.4, 0.6, 0.8]), 20: np.array([0.5, 0.5, 0.9, 0.1])}
    heavy = {10: np.array([0.9, 0.7, 0.5, 0.3]), 20: np.array([0.6, 0.6, 0.6, 0.6])}
    options = operating_points(light, heavy, [0.5, 0.3, 0.7], {10: 0.1, 20: 0.2}, {10: 0.3, 20: 0.6})
    assert [(o["steps"], o["threshold"]) for o in options] == [(10, 0.3), (10, 0.5), (10, 0.7),
                                                               (20, 0.3), (20, 0.5), (20, 0.7)]
    by = {(o["steps"], o["threshold"]): o for o in options}
    # steps 10, threshold 0.5: 0.2 and 0.4 escalate (heavy 0.9, 0.7), 0.6 and 0.8 stay.
    assert by[10, 0.5]["escalation"] == 0.5 and by[10, 0.5]["quality"] == pytest.approx((0.9 + 0.7 + 0.6 + 0.8) / 4)
    assert by[10, 0.3]["escalation"] == 0.25 and by[10, 0.7]["escalation"] == 0.75
    # A score equal to the threshold stays light, as the router keeps it.
    assert by[20, 0.5]["escalation"] == 0.25 and by[20, 0.5]["quality"] == pytest.approx((0.5 + 0.5 + 0.9 + 0.6) / 4)
    assert (by[20, 0.7]["light_s"], by[20, 0.7]["heavy_s"]) == (0.2, 0.6)
    assert_monotone_escalation(options)
    _check_options(options, "options")
    registry_with(options)


def test_operating_points_on_random_scores_are_valid_registry_options():
    rng = np.random.default_rng(0)
    light = {s: rng.uniform(0, 1, 50) for s in (10, 20, 40)}
    heavy = {s: rng.uniform(0, 1, 50) for s in (10, 20, 40)}
    thresholds = [round(t, 2) for t in rng.uniform(0, 1, 7)]
    options = operating_points(light, heavy, thresholds, {10: 0.1, 20: 0.2, 40: 0.4}, {10: 0.3, 20: 0.6, 40: 1.2})
    assert len(options) == 21
    assert_monotone_escalation(options)
    family = registry_with(options).families["tiny"]
    assert family.cascade["options"] == options
    with pytest.raises(ProfileError, match="6 light and 5 heavy"):
        operating_points({1: np.zeros(6)}, {1: np.zeros(5)}, [0.5], {1: 0.1}, {1: 0.1})


def test_request_names_map_the_cascade_models_to_what_clients_ask_for():
    pipeline = {"cascade": {"light": "unet_tiny_lite", "heavy": "unet"},
                "unets": {"default": "unet", "tiny-lite": "unet_tiny_lite"},
                "limits": {"unets": ["default", "tiny-lite", "cascade"]}}
    assert request_names(pipeline) == ("tiny-lite", "default")
    pipeline["limits"]["unets"] = ["default", "cascade"]
    with pytest.raises(ProfileError, match="no served unet variant runs the cascade's light model 'unet_tiny_lite'"):
        request_names(pipeline)


def test_lists_are_parsed_sorted_and_checked():
    assert _parse("20,10, 10", int, "--steps", 1, 1000) == [10, 20]
    assert _parse("0.7,0.3", float, "--thresholds", 0, 1) == [0.3, 0.7]
    with pytest.raises(ProfileError, match="--thresholds 1.5: out of range; allowed 0..1"):
        _parse("0.5,1.5", float, "--thresholds", 0, 1)
    with pytest.raises(ProfileError, match="--steps x: expected comma-separated ints"):
        _parse("x", int, "--steps", 1, 1000)


def test_profile_seconds_follow_the_orchestrators_latency_model():
    profile = {"unet": [["light", 64, 64, 2, 0.01], ["heavy", 64, 64, 2, 0.03]],
               "stages": [["encode", 2, 0.005], ["decode", 4096, 0.02]]}
    assert profile_seconds(profile, "light", "heavy", 10, 64, 64, 2) == pytest.approx((0.005 + 0.1 + 0.02, 0.3 + 0.02))
    predictor = LatencyPredictor()
    predictor.seed(profile)
    light_s, _ = profile_seconds(profile, "light", "heavy", 10, 128, 128, 1)  # not profiled: the predictor's fit
    assert light_s == pytest.approx(predictor.encode(1) + 10 * predictor.unet_step("light", 128, 128, 1)
                                    + predictor.decode(128 * 128))
    with pytest.raises(ProfileError, match="no UNet times for 'other'"):
        profile_seconds(profile, "light", "other", 10, 64, 64, 2)


def test_write_options_goes_into_pipeline_json_and_the_manifest(tmp_path):
    (tmp_path / "orchestrator" / "1").mkdir(parents=True)
    pipeline = {"model": "tiny", "cascade": {"light": "l", "heavy": "h", "threshold": 0.5, "options": []}}
    (tmp_path / "orchestrator" / "1" / "pipeline.json").write_text(json.dumps(pipeline))
    (tmp_path / "export_manifest.json").write_text(json.dumps({"fingerprint": {"x": 1}, "pipeline": pipeline}))
    options = [{"threshold": 0.5, "steps": 10, "escalation": 0.2, "quality": 0.4, "light_s": 0.1, "heavy_s": 0.3}]
    write_options(tmp_path, options)
    written = json.loads((tmp_path / "orchestrator" / "1" / "pipeline.json").read_text())
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    assert written == {**pipeline, "cascade": {**pipeline["cascade"], "options": options}}
    assert manifest["pipeline"]["cascade"]["options"] == options and manifest["fingerprint"] == {"x": 1}


def test_says_when_the_orchestrators_config_keeps_the_controller_off(tmp_path):
    config = tmp_path / "orchestrator" / "config.pbtxt"
    config.parent.mkdir()
    line = 'parameters {{ key: "{}" value {{ string_value: "{}" }} }}\n'
    config.write_text(line.format("controller_gpus", "1") + line.format("cascade_routing", "on"))
    assert controller_blocked(tmp_path) is None
    config.write_text(line.format("cascade_threshold", "1.01"))
    assert controller_blocked(tmp_path) == "its cascade_threshold parameter fixes the threshold at 1.01"
    config.write_text(line.format("cascade_routing", "off"))
    assert controller_blocked(tmp_path) == "its cascade_routing parameter is off"


def test_escalation_fractions_become_thresholds_that_escalate_exactly_that_fraction():
    scores = np.array([0.02, 0.9, 0.4, 0.1, 0.7, 0.3, 0.05, 0.6])
    thresholds = escalation_thresholds(scores, [0.0, 0.25, 0.5, 1.0])
    assert [float((scores < t).mean()) for t in thresholds] == [0.0, 0.25, 0.5, 1.0]
    assert all(0.0 <= t <= 1.0 for t in thresholds)
    options = operating_points({8: scores}, {8: scores + 0.05}, thresholds, {8: 0.1}, {8: 0.2})
    assert [o["escalation"] for o in options] == [0.0, 0.25, 0.5, 1.0]
    _check_options(options, "options")


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def cascade_repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_cascade") / "model_repository"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--preset", "tiny", "--unet-variant",
                    "tiny-lite", "--cascade", "tiny-lite", "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.mark.server
def test_command_profiles_valid_options_and_writes_them_for_the_controller(cascade_repository, tmp_path):
    out, report = tmp_path / "options.json", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "perf.profile_cascade", "--repo", str(cascade_repository),
                           "--steps", "4", "--thresholds", "0.7,0.3,0.5", "--n", "6", "--out", str(out),
                           "--report", str(report), "--write"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    options = json.loads(out.read_text())
    _check_options(options, "options")
    registry_with(options)
    assert [(o["steps"], o["threshold"]) for o in options] == [(4, 0.3), (4, 0.5), (4, 0.7)]
    assert_monotone_escalation(options)
    # The numbers are the arithmetic of the scores the gate gave (the report lists them per query).
    info = json.loads(report.read_text())
    assert (info["light"], info["heavy"]) == ({"unet": "tiny-lite", "model": "unet_tiny_lite"},
                                              {"unet": "default", "model": "unet"})
    light, heavy = (np.array(info["scores"]["4"][role]) for role in ("light", "heavy"))
    assert len(light) == len(heavy) == 6 and ((0 <= light) & (light <= 1)).all()
    for option in options:
        escalated = light < option["threshold"]
        assert option["escalation"] == pytest.approx(escalated.mean(), abs=1e-6)
        assert option["quality"] == pytest.approx(np.where(escalated, heavy, light).mean(), abs=1e-5)
    # GPU-seconds from the repository's own latency model (profile.json), at 64x64 with guidance: 2 rows.
    profile = json.loads((cascade_repository / "orchestrator" / "1" / "profile.json").read_text())
    expected = profile_seconds(profile, "unet_tiny_lite", "unet", 4, 64, 64, 2)
    assert (options[0]["light_s"], options[0]["heavy_s"]) == pytest.approx(expected, rel=1e-5)
    # --write: the orchestrator's next load runs the controller over exactly these options.
    pipeline = json.loads((cascade_repository / "orchestrator" / "1" / "pipeline.json").read_text())
    assert pipeline["cascade"]["options"] == options
    manifest = json.loads((cascade_repository / "export_manifest.json").read_text())
    assert manifest["pipeline"]["cascade"]["options"] == options
    _, _, controller = cascade_of(OrchestratorConfig(), pipeline)
    assert [o.threshold for o in controller.options] == [0.3, 0.5, 0.7]
    assert "controller uses them at its next load" in proc.stdout and "will not use them" not in proc.stderr


@pytest.mark.server
def test_a_gate_trained_on_the_repositorys_answers_gives_the_controller_options_to_trade(cascade_repository,
                                                                                         tmp_path):
    # The seeded random gate scores every answer alike; trained heavy (real) vs light (generated), the heavy
    # model's answers score higher, so escalating more buys quality and the options differ in more than cost.
    repo = tmp_path / "repo"
    shutil.copytree(cascade_repository, repo, symlinks=True)
    before = (repo / "quality_gate" / "1" / "gate.pt").read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    trained = subprocess.run([sys.executable, "-m", "perf.train_gate", "--repo", str(repo), "--n", "8", "--steps", "4",
                              "--sizes", "64", "--epochs", "40", "--out", str(tmp_path / "gate.json"), "--write"],
                             cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    info = json.loads((tmp_path / "gate.json").read_text())
    assert (info["trained_on"], info["held_out"]) == (6, 2) and 0.0 <= info["held_out_accuracy"] <= 1.0
    assert (repo / "quality_gate" / "1" / "gate.pt").read_bytes() != before
    pipeline = json.loads((repo / "orchestrator" / "1" / "pipeline.json").read_text())
    assert pipeline["gate"]["trained"] is True and pipeline["gate"]["trained_by"] == "perf.train_gate"
    out = tmp_path / "options.json"
    profiled = subprocess.run([sys.executable, "-m", "perf.profile_cascade", "--repo", str(repo), "--steps", "4",
                               "--escalate", "0,0.5,1", "--n", "8", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    options = json.loads(out.read_text())  # scored by the served quality_gate, which loaded the new weights
    _check_options(options, "options")
    assert [o["escalation"] for o in options] == [0.0, 0.5, 1.0]
    qualities = [o["quality"] for o in options]
    assert qualities == sorted(qualities) and qualities[-1] > qualities[0] + 0.1, options
