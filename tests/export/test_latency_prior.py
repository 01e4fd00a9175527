"""The latency prior of the NGC target: the H100 anchors for the SD1.5 architecture, scaled, and an
SLO the GPU meets is admitted from the first request instead of rejected by the predictor's fallback."""

import pytest

from triffusion import contract
from triffusion.export.latency_prior import ANCHOR, latency_prior, unet_seconds
from triffusion.orchestrator.config import OrchestratorConfig, build_scheduler
from triffusion.orchestrator.errors import Rejected
from triffusion.orchestrator.predictor import LatencyPredictor

from ..orchestrator.fakes import make_state

SD15 = {contract.TEXT_ENCODER: 123e6, contract.UNET: 859.5e6, contract.VAE_DECODER: 83.65e6}


def sd15_prior(**kwargs):
    return latency_prior(SD15, [contract.UNET], [512, 768], [1, 2, 4, 8, 16], max_encode_rows=16, max_images=4,
                         **kwargs)


def test_sd15_parameters_give_back_the_measured_anchors():
    prior = sd15_prior()
    unet = {(h, rows): s for _, h, _, rows, s in prior["unet"]}
    assert unet[(512, 2)] == pytest.approx(10.7e-3) and unet[(512, 16)] == pytest.approx(56.2e-3)
    assert unet[(768, 8)] == pytest.approx(74.5e-3)
    assert unet[(512, 4)] == pytest.approx(10.7e-3 + (29.7e-3 - 10.7e-3) * 2 / 6, rel=1e-3)  # between measured rows
    stages = {(stage, size): s for stage, size, s in prior["stages"]}
    assert stages[("encode", 2)] == pytest.approx(5.7e-3) and stages[("decode", 4 * 512 * 512)] == pytest.approx(67e-3)
    assert prior["source"] == "prior" and prior["prior"]["parameters"] == SD15


def test_a_smaller_model_or_image_costs_proportionally_less():
    full = unet_seconds(ANCHOR["unet_params"], 64 * 64, 2)
    assert unet_seconds(ANCHOR["unet_params"] / 2, 64 * 64, 2) == pytest.approx(full / 2)
    assert unet_seconds(ANCHOR["unet_params"], 32 * 32, 2) == pytest.approx(full / 4)


def test_the_prior_admits_what_the_fallback_rejects():
    """A 50-step CFG 512x512 request with a 2 s SLO: ~0.6 s on an H100; the fallback predicts ~52 s."""
    def request():
        state = make_state(1, size=512, steps=50, stream=False)
        state.params.slo_ms = 2000
        return state

    assert 50 * LatencyPredictor().unet_step(contract.UNET, 512, 512, 2) > 50
    with pytest.raises(Rejected, match="slo_ms 2000 cannot be met"):
        build_scheduler(OrchestratorConfig(), models=[contract.UNET]).add(request(), now=0.0)
    admitted = request()
    build_scheduler(OrchestratorConfig(), profile=sd15_prior(), models=[contract.UNET]).add(admitted, now=0.0)
    assert admitted.params.steps == 50  # admitted at the steps it asked for
