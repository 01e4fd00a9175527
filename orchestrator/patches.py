"""Patch-level hybrid-resolution batching (after PatchedServe): latents of any size that is a multiple
of the patch are cut into fixed-size patches, each carrying a halo of neighbouring latent, so one UNet
call serves patches of requests at several resolutions. Outputs are cropped back to the patch and
stitched. The halo bounds how far the UNet sees past its patch, so the result differs from
whole-image execution near patch borders; perf/patch_quality.py measures by how much."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    patch: int  # latent pixels per patch side
    halo: int  # latent pixels of context on each side

    @property
    def tile(self) -> int:
        return self.patch + 2 * self.halo

    def fits(self, height: int, width: int) -> bool:
        """Latent height and width must be whole patches."""
        return height % self.patch == 0 and width % self.patch == 0

    def count(self, height: int, width: int) -> int:
        return (height // self.patch) * (width // self.patch)

    def split(self, latent: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R * nh * nw, C, tile, tile), row-major patches per row of R.
        Borders get replicated context, as the image edge has no neighbour."""
        rows, channels, height, width = latent.shape
        padded = F.pad(latent, (self.halo,) * 4, mode="replicate")
        tiles = padded.unfold(2, self.tile, self.patch).unfold(3, self.tile, self.patch)  # R, C, nh, nw, t, t
        nh, nw = tiles.shape[2], tiles.shape[3]
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(rows * nh * nw, channels, self.tile, self.tile)

    def stitch(self, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of split on the patch interiors: (R * nh * nw, C, tile, tile) -> (R, C, H, W)."""
        nh, nw = height // self.patch, width // self.patch
        channels = tiles.shape[1]
        core = tiles[:, :, self.halo:self.halo + self.patch, self.halo:self.halo + self.patch]
        rows = core.shape[0] // (nh * nw)
        core = core.reshape(rows, nh, nw, channels, self.patch, self.patch)
        return core.permute(0, 3, 1, 4, 2, 5).reshape(rows, channels, height, width)
