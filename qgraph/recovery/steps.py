"""Recovery: which post-training recovery methods a tool runs on a calibrated QuantizedNet, and in
what order: AdaRound first (it fits each layer's output, bias included, to the float model's),
then bias correction (which moves what remains of each layer's mean error into its bias)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ConfigError
from .adaround import ITERATIONS, adaround
from .bias_correction import correct_bias


@dataclass(frozen=True)
class Recovery:
    """adaround: learn the weights' rounding (`iterations` per layer, on at most `images`
    calibration images, drawn with `seed`); bias_correction: empirical bias correction."""

    adaround: bool = False
    iterations: int = ITERATIONS
    images: int | None = None
    seed: int = 0
    bias_correction: bool = False

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"Recovery.iterations={self.iterations!r}: must be a positive integer")
        if self.images is not None and (isinstance(self.images, bool) or not isinstance(self.images, int)
                                        or self.images < 1):
            raise ConfigError(f"Recovery.images={self.images!r}: must be a positive integer or None")

    @property
    def active(self) -> bool:
        return self.adaround or self.bias_correction

    def run(self, net, data, progress: bool = True) -> dict:
        """Run the chosen methods on `net`; returns {method: {"seconds": s, "layers": {...}}}."""
        done = {}
        if self.adaround:
            start = time.perf_counter()
            fits = adaround(net, data, iterations=self.iterations, num_images=self.images, seed=self.seed,
                            progress=progress)
            done["adaround"] = {"seconds": time.perf_counter() - start,
                                "layers": {layer: fit.as_dict() for layer, fit in fits.items()}}
        if self.bias_correction:
            start = time.perf_counter()
            corrections = correct_bias(net, data, progress=progress)
            done["bias_correction"] = {"seconds": time.perf_counter() - start,
                                       "layers": {layer: float(abs(c).max()) for layer, c in corrections.items()}}
        return done
