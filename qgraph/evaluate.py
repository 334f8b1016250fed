"""Top-1 accuracy of a block: over arrays, or over a stream of (images, labels) batches with
per-class figures (the seed's `acc` and `avg_acc`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import mxnet as mx
import numpy as np
from tqdm import tqdm

from .errors import DataError


def predict(block, images: np.ndarray, batch_size: int = 256, ctx=None) -> np.ndarray:
    """Arg-max class of every image, in order."""
    ctx = ctx or mx.cpu()
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = mx.nd.array(images[start:start + batch_size], ctx=ctx)
        predictions.append(block(batch).argmax(axis=1).asnumpy().astype(np.int64))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def top1(block, images: np.ndarray, labels: np.ndarray, batch_size: int = 256, ctx=None) -> float:
    """Fraction of images whose arg-max class equals the label."""
    return float(np.mean(predict(block, images, batch_size, ctx) == labels))


@dataclass(frozen=True)
class Accuracy:
    """top1: correct / images; avg_acc: the mean of the per-class accuracies; per_class: each
    class's accuracy (NaN for a class with no image)."""

    top1: float
    avg_acc: float
    images: int
    per_class: tuple

    def as_dict(self) -> dict:
        return {"top1": self.top1, "avg_acc": self.avg_acc, "images": self.images}


def accuracy(block, batches: Iterable, classes: int, batch_size: int = 256, ctx=None, desc: str = "eval",
             progress: bool = False, total: int | None = None) -> Accuracy:
    """Accuracy of `block` over (images, labels) numpy batches, with a tqdm bar when `progress`."""
    correct, seen = np.zeros(classes), np.zeros(classes)
    for images, labels in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        hits = predict(block, images, batch_size, ctx) == labels
        np.add.at(seen, labels, 1)
        np.add.at(correct, labels, hits)
    if not seen.sum():
        raise DataError("the evaluation set is empty")
    present = seen > 0
    per_class = np.where(present, correct / np.maximum(seen, 1), np.nan)
    return Accuracy(float(correct.sum() / seen.sum()), float(np.mean(per_class[present])), int(seen.sum()),
                    tuple(float(v) for v in per_class))
