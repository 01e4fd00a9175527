"""Orchestrator parameters: defaults, entropy thresholds, and a named error for a bad key."""

import pytest

from triffusion.orchestrator.config import build_engine, check_parameters

from .fakes import SCHEDULER_CONFIG, FakeExecutor

PIPELINE = {"model": "fake", "scheduler_config": SCHEDULER_CONFIG, "latent_channels": 4, "vae_scale_factor": 8,
            "vae_scaling_factor": 0.18215, "unets": {"default": "unet", "lite": "unet_lite"},
            "limits": {"size_multiple": 16, "unets": ["default", "lite"]}}


def test_parameters_build_the_engine():
    engine, limits = build_engine({"max_active": "3", "policy": "srpt", "entropy_threshold": "0.5",
                                   "entropy_patience": "4"}, PIPELINE, FakeExecutor())
    assert engine.scheduler.max_active == 3 and engine.scheduler.policy.name == "srpt"
    assert engine.entropy == {"unet": {"threshold": 0.5, "patience": 4}, "unet_lite": {"threshold": 0.5, "patience": 4}}
    assert limits.unets == ("default", "lite")


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="unknown orchestrator parameter\\(s\\): max_actve; known: .*max_active"):
        check_parameters({"max_actve": "3"})


def test_unknown_policy_fails_at_build():
    with pytest.raises(ValueError, match="unknown policy 'lifo'"):
        build_engine({"policy": "lifo"}, PIPELINE, FakeExecutor())


def test_registry_entropy_applies_and_parameters_override_it():
    pipeline = {**PIPELINE, "registry": {"entropy": {"threshold": 0.02, "patience": 3}}}
    engine, _ = build_engine({}, pipeline, FakeExecutor())
    assert engine.entropy["unet_lite"] == {"threshold": 0.02, "patience": 3}
    engine, _ = build_engine({"entropy_patience": "5"}, pipeline, FakeExecutor())
    assert engine.entropy["unet"] == {"threshold": 0.02, "patience": 5}
