"""Patch split/stitch: exact round trip, and exact for any operator whose reach fits in the halo."""

import pytest
import torch
import torch.nn.functional as F

from triffusion.orchestrator.patches import PatchGrid


@pytest.mark.parametrize("height, width", [(8, 8), (16, 8), (32, 24)])
def test_split_then_stitch_is_identity(height, width):
    grid = PatchGrid(patch=8, halo=4)
    latent = torch.randn(2, 4, height, width)
    tiles = grid.split(latent)
    assert tiles.shape == (2 * grid.count(height, width), 4, 16, 16)
    assert torch.equal(grid.stitch(tiles, height, width), latent)


def test_local_operator_within_halo_matches_whole_image():
    """A 5x5 blur reaches 2 pixels: with a halo of 2 and replicate borders it is exact on patches."""
    grid = PatchGrid(patch=8, halo=2)
    latent = torch.randn(1, 4, 24, 16)
    kernel = torch.ones(4, 1, 5, 5) / 25
    blur = lambda x: F.conv2d(F.pad(x, (2,) * 4, mode="replicate"), kernel, groups=4)
    assert torch.allclose(grid.stitch(blur(grid.split(latent)), 24, 16), blur(latent), atol=1e-6)


def test_fits_requires_whole_patches():
    grid = PatchGrid(patch=8, halo=4)
    assert grid.fits(16, 24) and not grid.fits(12, 16)
