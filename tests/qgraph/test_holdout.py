"""data.holdout_subset: class-balanced training images outside the calibration subset (never the
test split), the same ones every time; CIFAR-10 when the shared data is there."""
import numpy as np
import pytest

from qgraph import data


def test_mnist_holdout_is_balanced_and_disjoint_from_calibration():
    (train_x, train_y), (test_x, _) = data.mnist_split()
    images, labels = data.holdout_subset("mnist", per_class=30, calib_per_class=20, seed=3)
    assert np.bincount(labels).tolist() == [30] * 10
    calibration = data.calibration_subset("mnist", per_class=20, seed=3)
    as_rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}  # noqa: E731
    assert not as_rows(images) & as_rows(calibration)
    assert as_rows(images) <= as_rows(train_x) and not as_rows(images) & as_rows(test_x)
    again, _ = data.holdout_subset("mnist", per_class=30, calib_per_class=20, seed=3)
    np.testing.assert_array_equal(images, again)


def test_too_many_per_class_is_named():
    with pytest.raises(data.ConfigError, match="fewer than num_per_class=400"):
        data.holdout_subset("mnist", per_class=400, calib_per_class=20)


@pytest.mark.skipif(data.default_cifar10_dir() is None, reason="CIFAR-10 RecordIO not in ../shared/data/cifar10")
def test_cifar10_holdout_reads_training_records():
    images, labels = data.holdout_subset("cifar10", per_class=2, calib_per_class=5)
    assert images.shape == (20, 3, 32, 32) and np.bincount(labels).tolist() == [2] * 10
    assert abs(float(images.mean())) < 1.0   # normalised as the evaluation images
