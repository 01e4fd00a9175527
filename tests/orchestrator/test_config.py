"""The typed orchestrator config: defaults in one place, string parameters parsed and checked by name,
entropy thresholds from the registry overridden by parameters."""

import pytest

from triffusion.orchestrator.config import OrchestratorConfig, build_engine

from .fakes import SCHEDULER_CONFIG, FakeExecutor

PIPELINE = {"model": "fake", "scheduler_config": SCHEDULER_CONFIG, "latent_channels": 4, "vae_scale_factor": 8,
            "vae_scaling_factor": 0.18215, "unets": {"default": "unet", "lite": "unet_lite"},
            "limits": {"size_multiple": 16, "unets": ["default", "lite"]}}


def config(**params):
    return OrchestratorConfig.from_parameters({k: str(v) for k, v in params.items()})


def test_parameters_build_the_engine():
    engine, limits = build_engine(config(max_active=3, policy="srpt", entropy_threshold=0.5, entropy_patience=4),
                                  PIPELINE, FakeExecutor())
    assert engine.scheduler.max_active == 3 and engine.scheduler.policy.name == "srpt"
    assert engine.scheduler.entropy == {"unet": {"threshold": 0.5, "patience": 4},
                                        "unet_lite": {"threshold": 0.5, "patience": 4}}
    assert limits.unets == ("default", "lite")


def test_parameters_round_trip_through_config_pbtxt_strings():
    original = OrchestratorConfig(max_active=5, cascade_threshold=0.25, unet_executor="inprocess")
    assert OrchestratorConfig.from_parameters(original.to_parameters()) == original


@pytest.mark.parametrize("params, message", [
    ({"max_actve": "3"}, r"unknown orchestrator parameter\(s\): max_actve; known: max_active, "),
    ({"max_active": "three"}, "orchestrator parameter max_active: 'three' is not a int"),
    ({"max_active": "0"}, "orchestrator parameter max_active: 0 is out of range; allowed >= 1"),
    ({"policy": "lifo"}, "orchestrator parameter policy: 'lifo' is unknown; choose one of: fcfs, edf, srpt, priority"),
    ({"hybrid": "tiles"}, "orchestrator parameter hybrid: 'tiles' is unknown; choose one of: bucket, patch, auto"),
    ({"component_timeout_s": "0"}, "component_timeout_s: 0.0 is out of range; allowed > 0"),
])
def test_bad_parameter_is_named(params, message):
    with pytest.raises(ValueError, match=message):
        OrchestratorConfig.from_parameters(params)


def test_registry_entropy_applies_and_parameters_override_it():
    pipeline = {**PIPELINE, "registry": {"entropy": {"threshold": 0.02, "patience": 3}}}
    engine, _ = build_engine(OrchestratorConfig(), pipeline, FakeExecutor())
    assert engine.scheduler.entropy["unet_lite"] == {"threshold": 0.02, "patience": 3}
    engine, _ = build_engine(config(entropy_patience=5), pipeline, FakeExecutor())
    assert engine.scheduler.entropy["unet"] == {"threshold": 0.02, "patience": 5}
