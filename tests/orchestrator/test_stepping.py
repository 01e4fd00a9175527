"""Entropy early stop and the one last step, on constructed latent sequences and a real scheduler."""

import pytest
import torch

from triffusion.orchestrator.engine import PipelineSpec, make_engine
from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.sampling import Sampler
from triffusion.orchestrator.scheduler import StepScheduler
from triffusion.orchestrator.stepping import EntropyStop, latent_entropy

from .fakes import SCHEDULER_CONFIG, FakeExecutor, make_state


def latents(widths):
    """Latents whose value spread (so entropy) follows `widths`, one per step."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 16, 16, generator=g)
    return [base * w for w in widths]


def sequence(widths):
    """The entropy the runner measures after each step of such latents."""
    return [latent_entropy(x) for x in latents(widths)]


def test_entropy_grows_with_spread():
    small, large = latents([0.1, 1.0])
    assert latent_entropy(large) > latent_entropy(small)


def test_stops_once_entropy_settles_after_patience():
    stop = EntropyStop(threshold=0.01, patience=2, min_fraction=0.0)
    widths = [3.0, 2.0, 1.5, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0]
    decisions = [stop.observe(x, i + 1, len(widths)) for i, x in enumerate(sequence(widths))]
    # Settled from step 5 on; two unchanged transitions are needed: steps 5->6 and 6->7.
    assert decisions.index(True) == 6


def test_never_stops_while_entropy_keeps_changing_or_too_early():
    changing = EntropyStop(threshold=0.01, patience=2, min_fraction=0.0)
    assert not any(changing.observe(x, i + 1, 10) for i, x in enumerate(sequence([4.0 - 0.35 * i for i in range(10)])))
    early = EntropyStop(threshold=0.01, patience=1, min_fraction=0.5)
    flat = sequence([1.0] * 10)
    assert [early.observe(x, i + 1, 10) for i, x in enumerate(flat)].index(True) == 4  # not before step 5 of 10


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_one_last_step_recovers_the_clean_sample(scheduler):
    """With the exact noise as prediction, the last step lands on x0 from any step."""
    config = dict(SCHEDULER_CONFIG)
    params = GenerationParams(prompt="x", steps=10, guidance_scale=1.0, seed=3, scheduler=scheduler)
    sampler = Sampler(params, config, (4, 8, 8))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    index = 4
    t = sampler.timesteps[index]
    if scheduler == "euler":
        sampler.latents = x0 + sampler.scheduler.sigmas[index] * noise
    else:
        alpha = sampler.scheduler.alphas_cumprod[int(t)]
        sampler.latents = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    sampler.last_step(index, noise)
    assert torch.allclose(sampler.latents, x0, atol=1e-4)


def test_engine_auto_mode_stops_early_and_reports_it():
    engine = make_engine(FakeExecutor(), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                         StepScheduler(entropy={"unet": {"threshold": 10.0, "patience": 1, "min_fraction": 0.3}}))
    auto, fixed = make_state(1, steps=20), make_state(2, steps=20)
    auto.params.step_mode = "auto"
    for s in (auto, fixed):
        engine.submit(s)
    while engine.scheduler.has_work:
        engine.step()
    auto_meta, fixed_meta = auto.sink.events[-1][2], fixed.sink.events[-1][2]
    # Settled as soon as 30% (6 steps) ran (the patience window reaches back before that), then the
    # last step: 7 evaluations.
    assert auto_meta["early_stop"] and auto_meta["steps_done"] == 7
    assert not fixed_meta["early_stop"] and fixed_meta["steps_done"] == 20
    assert auto.sink.events[-1][1].shape == (64, 64, 3)
