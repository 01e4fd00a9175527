"""The runner keeps every text-encoder and VAE call within the engines' profiles (OrchestratorConfig's
max_encode_rows and max_decode_batch, written by the NGC export): more requests than a profile allows
are split into calls within it."""

from triffusion.contract import TEXT_ENCODER_MAX_BATCH
from triffusion.orchestrator.config import OrchestratorConfig, build_engine

from .fakes import SCHEDULER_CONFIG, FakeExecutor, make_state

PIPELINE = {"model": "fake", "scheduler_config": SCHEDULER_CONFIG, "latent_channels": 4, "vae_scale_factor": 8,
            "vae_scaling_factor": 0.18215, "limits": {"min_size": 64, "max_size": 512}}


def serve_together(config: OrchestratorConfig, requests: int) -> FakeExecutor:
    """`requests` CFG requests with equal steps submitted at once: they encode together and finish together."""
    executor = FakeExecutor()
    engine, _ = build_engine(config, PIPELINE, executor)
    states = [make_state(i, steps=3) for i in range(requests)]
    for state in states:
        engine.submit(state)
    for _ in range(100):
        if not engine.scheduler.has_work:
            break
        engine.step()
    assert [s.sink.outcome for s in states] == ["finish"] * requests
    engine.runner.close()
    return executor


def sizes(executor: FakeExecutor, stage: str) -> list[int]:
    return [n for name, n in executor.calls if name == stage]


def test_eight_finishers_decode_in_calls_of_at_most_the_vae_profiles_images():
    executor = serve_together(OrchestratorConfig(max_active=8, max_decode_batch=4), 8)
    assert sizes(executor, "decode") == [4, 4]


def test_encoding_more_rows_than_the_text_encoder_profile_is_split():
    executor = serve_together(OrchestratorConfig(max_active=8, max_encode_rows=4), 8)
    encoded = sizes(executor, "encode")
    assert sum(encoded) == 16 and max(encoded) <= 4  # two rows (CFG) per request


def test_without_caps_the_calls_are_whole_and_the_encoder_keeps_its_max_batch():
    executor = serve_together(OrchestratorConfig(max_active=8), 8)
    assert sizes(executor, "decode") == [8] and sizes(executor, "encode") == [16]
    engine, _ = build_engine(OrchestratorConfig(), PIPELINE, FakeExecutor())
    assert engine.runner.max_encode_rows == TEXT_ENCODER_MAX_BATCH and engine.runner.max_decode_batch is None
    engine.runner.close()
