"""Online latency predictor: per (model, latent height, latent width, UNet rows) step times and per
stage times, learned from measured executions (EWMA) and seeded from a profile.

For a shape never measured it falls back to a per-model linear fit t = a + b * rows * latent pixels
over the shapes it has measured, then to the prior."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LatencyPredictor:
    alpha: float = 0.3  # EWMA weight of a new measurement
    prior_per_row_pixel_s: float = 2e-6  # used before anything is measured: conservative on purpose
    prior_encode_s: float = 0.02
    prior_decode_per_pixel_s: float = 5e-6
    unet: dict[tuple, float] = field(default_factory=dict)
    stages: dict[tuple, float] = field(default_factory=dict)
    _fits: dict[str, tuple[float, float]] = field(default_factory=dict)

    # ---- learning -------------------------------------------------------------------------
    def observe_unet(self, model: str, h: int, w: int, rows: int, seconds: float) -> None:
        key = (model, h, w, rows)
        old = self.unet.get(key)
        self.unet[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self._fits.pop(model, None)

    def observe_stage(self, stage: str, size: int, seconds: float) -> None:
        """stage 'encode' (size = rows), 'decode' (size = image pixels of the batch) or 'gate' (size = images)."""
        key = (stage, size)
        old = self.stages.get(key)
        self.stages[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def seed(self, profile: dict) -> None:
        """Load a profile: {"unet": [[model, h, w, rows, seconds], ...], "stages": [[stage, size, seconds]]}."""
        for model, h, w, rows, seconds in profile.get("unet", []):
            self.unet[(model, h, w, rows)] = seconds
        for stage, size, seconds in profile.get("stages", []):
            self.stages[(stage, size)] = seconds
        self._fits.clear()

    def to_profile(self) -> dict:
        return {"unet": [[*k, v] for k, v in sorted(self.unet.items())],
                "stages": [[*k, v] for k, v in sorted(self.stages.items())]}

    # ---- prediction -----------------------------------------------------------------------
    def unet_step(self, model: str, h: int, w: int, rows: int) -> float:
        if rows <= 0:
            return 0.0
        exact = self.unet.get((model, h, w, rows))
        if exact is not None:
            return exact
        a, b = self._fit(model)
        return a + b * rows * h * w

    def encode(self, rows: int) -> float:
        return self._stage("encode", rows, self.prior_encode_s)

    def gate(self, images: int) -> float:
        """The quality gate scoring `images` light answers (nothing known yet: free)."""
        return self._stage("gate", images, 0.0)

    def decode(self, pixels: int) -> float:
        return self._stage("decode", pixels, self.prior_decode_per_pixel_s * pixels)

    def _stage(self, stage: str, size: int, prior: float) -> float:
        exact = self.stages.get((stage, size))
        if exact is not None:
            return exact
        known = [(s, t) for (name, s), t in self.stages.items() if name == stage]
        if not known:
            return prior
        s, t = min(known, key=lambda st: abs(st[0] - size))  # nearest measured size, scaled
        return t * max(size, 1) / max(s, 1) if stage == "decode" else t

    def _fit(self, model: str) -> tuple[float, float]:
        if model in self._fits:
            return self._fits[model]
        points = [(rows * h * w, t) for (m, h, w, rows), t in self.unet.items() if m == model]
        if not points:
            fit = (0.0, self.prior_per_row_pixel_s)
        elif len({x for x, _ in points}) == 1:
            x, t = points[0]
            fit = (0.0, t / x)
        else:  # least squares, intercept clamped at >= 0 (launch overhead)
            n = len(points)
            mx = sum(x for x, _ in points) / n
            mt = sum(t for _, t in points) / n
            var = sum((x - mx) ** 2 for x, _ in points)
            b = max(sum((x - mx) * (t - mt) for x, t in points) / var, 1e-12)
            a = max(mt - b * mx, 0.0)
            fit = (a, b)
        self._fits[model] = fit
        return fit
