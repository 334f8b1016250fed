"""What every deployment check measures: a runtime's FP32 model against MXNet (the largest
difference relative to the largest output) and its int8 model against the simulation over
the same images (top-1 of each and per-sample agreement), with the tolerances --verify holds
them to."""
from __future__ import annotations

from dataclasses import dataclass, field

import mxnet as mx
import numpy as np

from ..graph import Graph
from ..io import to_block

FP32_TOLERANCE = 1e-4      # max relative difference of a runtime's FP32 model against MXNet
TOP1_TOLERANCE = 0.3       # points of top-1 between a runtime's int8 model and the simulation


@dataclass(frozen=True)
class Verification:
    """FP32 against MXNet (max relative difference), and, with an int8 model, the runtime's
    int8 against the simulation: top-1 of each (percent, None without labels) and per-sample
    agreement (percent). `notes` are the runtime's own lines, `details` their numbers."""

    fp32_relative: float
    images: int
    runtime_top1: float | None = None
    simulated_top1: float | None = None
    agreement: float | None = None
    notes: tuple = ()
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        int8_ok = self.runtime_top1 is None or abs(self.runtime_top1 - self.simulated_top1) <= TOP1_TOLERANCE
        return self.fp32_relative <= FP32_TOLERANCE and int8_ok


def float_outputs(graph: Graph, images: np.ndarray) -> np.ndarray:
    """MXNet's outputs of a float graph: the reference of every FP32 check."""
    return to_block(graph)(mx.nd.array(images)).asnumpy()


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    ours = np.asarray(ours).reshape(reference.shape)
    return float(np.abs(ours - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def compare(fp32_relative: float, runtime_top: np.ndarray, simulated_top: np.ndarray, labels=None, notes=(),
            details=None) -> Verification:
    """The Verification of a runtime's and the simulation's predicted classes."""
    top1 = (lambda top: None if labels is None else 100 * float((top == labels).mean()))
    return Verification(fp32_relative, len(runtime_top), top1(runtime_top), top1(simulated_top),
                        100 * float((runtime_top == simulated_top).mean()), tuple(notes), dict(details or {}))
