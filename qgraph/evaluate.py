"""Top-1 accuracy of a block on in-memory arrays."""
from __future__ import annotations

import numpy as np


def predict(block, images: np.ndarray, batch_size: int = 256, ctx=None) -> np.ndarray:
    """Arg-max class of every image, in order."""
    import mxnet as mx

    ctx = ctx or mx.cpu()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = mx.nd.array(images[start:start + batch_size], ctx=ctx)
        predictions.append(block(batch).argmax(axis=1).asnumpy().astype(np.int64))
    return np.concatenate(predictions)


def top1(block, images: np.ndarray, labels: np.ndarray, batch_size: int = 256, ctx=None) -> float:
    """Fraction of images whose arg-max class equals the label."""
    return float(np.mean(predict(block, images, batch_size, ctx) == labels))
