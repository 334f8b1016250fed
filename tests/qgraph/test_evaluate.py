"""qgraph.evaluate: predictions in order over batches, top-1, and per-class accuracy."""
import mxnet as mx
import numpy as np
import pytest

from qgraph import DataError
from qgraph.evaluate import accuracy, predict, top1


class Lookup:
    """A 'block' whose logits put the highest score on the class stored for each image's value."""

    def __call__(self, batch):
        classes = batch.asnumpy().reshape(len(batch), -1)[:, 0].astype(int)
        return mx.nd.array(np.eye(3)[classes])


def test_predictions_keep_their_order_across_batches():
    images = np.array([0, 2, 1, 1, 0, 2, 2], np.float32).reshape(-1, 1)
    assert predict(Lookup(), images, batch_size=3).tolist() == [0, 2, 1, 1, 0, 2, 2]
    assert top1(Lookup(), images, np.array([0, 2, 1, 0, 0, 2, 1])) == pytest.approx(5 / 7)


def test_accuracy_per_class_and_their_mean():
    images = np.array([0, 0, 0, 1, 2, 2], np.float32).reshape(-1, 1)
    labels = np.array([0, 0, 1, 1, 2, 0])
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    result = accuracy(Lookup(), batches, classes=4)
    assert result.top1 == pytest.approx(4 / 6) and result.images == 6
    assert result.per_class[:3] == pytest.approx((2 / 3, 1 / 2, 1.0)) and np.isnan(result.per_class[3])
    assert result.avg_acc == pytest.approx(np.mean([2 / 3, 1 / 2, 1.0]))  # classes with no image left out
    assert result.as_dict() == {"top1": result.top1, "avg_acc": result.avg_acc, "images": 6}


def test_an_empty_evaluation_set_is_an_error():
    with pytest.raises(DataError, match="empty"):
        accuracy(Lookup(), [], classes=3)
