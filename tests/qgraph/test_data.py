"""qgraph.data: RecordIO checks before MXNet's iterator, the one calibration subset, evaluation
sets, calibration files in every format, and the bundled MNIST split."""
import cv2
import mxnet as mx
import numpy as np
import pytest
from helpers import write_recordio

from qgraph import DataError, data
from qgraph.errors import ConfigError


def _write_rec(folder, name="set", count=6, corrupt=None, shape=(12, 10, 3)):
    return write_recordio(folder, name, count, corrupt, shape)


def test_a_valid_file_passes_with_and_without_its_index(tmp_path):
    rec = _write_rec(tmp_path)
    assert data.check_recordio(rec) == 6
    rec.with_suffix(".idx").unlink()
    assert data.check_recordio(rec) == 6  # walked record by record


def test_a_truncated_file_is_named_with_the_record(tmp_path):
    rec = _write_rec(tmp_path)
    size = rec.stat().st_size
    with open(rec, "r+b") as stream:
        stream.truncate(size // 2)
    with pytest.raises(DataError, match=r"set\.rec: record \d+ .*truncated"):
        data.check_recordio(rec)
    rec.with_suffix(".idx").unlink()
    with pytest.raises(DataError, match="truncated"):
        data.check_recordio(rec)


def test_an_index_of_another_file_is_caught(tmp_path):
    rec = _write_rec(tmp_path)
    offsets = [line.split() for line in rec.with_suffix(".idx").read_text().splitlines()]
    rec.with_suffix(".idx").write_text("".join(f"{k}\t{int(v) + 4}\n" for k, v in offsets))
    with pytest.raises(DataError, match="no RecordIO header at record 0"):
        data.check_recordio(rec)
    rec.with_suffix(".idx").write_text("garbage line\n")
    with pytest.raises(DataError, match="line 1"):
        data.check_recordio(rec)


def test_a_record_that_does_not_decode_is_named(tmp_path):
    rec = _write_rec(tmp_path, corrupt=4)
    assert data.check_recordio(rec) == 6  # headers are fine: only decoding finds it
    with pytest.raises(DataError, match=r"set\.rec: record 4 does not decode"):
        data.read_records(rec, [1, 4], "cifar10")
    with pytest.raises(DataError, match=r"record 4 does not decode"):
        data.load_calibration_data(rec, (1, 3, 8, 8))
    assert data.read_records(rec, [0, 1], "cifar10").shape == (2, 3, 12, 10)


def test_record_labels_come_from_the_headers(tmp_path):
    rec = _write_rec(tmp_path)
    assert data.record_labels(rec).tolist() == [0, 1, 2, 0, 1, 2]


def test_records_are_normalised_as_the_dataset_says(tmp_path):
    rec = _write_rec(tmp_path)
    raw = mx.image.imdecode(mx.recordio.unpack(mx.recordio.MXRecordIO(str(rec), "r").read())[1]).asnumpy()
    mean, std = np.array(data.CIFAR10.mean, np.float32), np.array(data.CIFAR10.std, np.float32)
    expected = ((raw.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(data.read_records(rec, [0], "cifar10")[0], expected, rtol=1e-6, atol=1e-6)


def test_calibration_subset_is_class_balanced_and_fixed_by_its_seed():
    first = data.calibration_subset("mnist", per_class=3, seed=7)
    again = data.calibration_subset("mnist", per_class=3, seed=7)
    other = data.calibration_subset("mnist", per_class=3, seed=8)
    assert first.shape == (30, 1, 28, 28) and np.array_equal(first, again) and not np.array_equal(first, other)
    (images, labels), _ = data.mnist_split()
    chosen = data.class_balanced_subset(labels, 3, seed=7)
    assert np.bincount(labels[chosen]).tolist() == [3] * 10
    np.testing.assert_array_equal(first, images[chosen])


def test_class_balanced_subset_refuses_what_it_cannot_give():
    with pytest.raises(ConfigError, match="fewer than num_per_class=3"):
        data.class_balanced_subset([0, 0, 0, 1, 1], 3)
    with pytest.raises(ConfigError, match="at least 1"):
        data.class_balanced_subset([0, 1], 0)


def test_calibration_files_in_every_format(tmp_path):
    images = np.random.RandomState(0).rand(6, 3, 8, 8).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "x.npz", data=images, label=np.array([0, 1, 2, 0, 1, 2]))
    loaded, labels = data.load_calibration_data(tmp_path / "x.npy", (1, 3, 8, 8))
    assert labels is None and np.array_equal(loaded, images)
    loaded, labels = data.load_calibration_data(tmp_path / "x.npz", (1, 3, 8, 8), num_per_class=1, seed=0)
    assert len(loaded) == 3 and sorted(labels.tolist()) == [0, 1, 2]
    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(2):
            image = np.random.RandomState(i).randint(0, 256, (10, 10, 3)).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "folder" / cls / f"{i}.png"), image)
    loaded, labels = data.load_calibration_data(tmp_path / "folder", (1, 3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert loaded.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name, content, message", [
    ("nan.npy", np.array([[np.nan]], np.float32), "NaN or Inf"),
    ("x.txt", None, "must be a .rec file"),
    ("missing.npy", None, "no such calibration data"),
])
def test_bad_calibration_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        np.save(path, content)
    elif name.endswith(".txt"):
        path.write_text("x")
    with pytest.raises((DataError, ConfigError), match=message):
        data.load_calibration_data(path, (1, 1, 1, 1))


def test_mnist_split_is_cached_and_read_only():
    (x_train, y_train), (x_test, y_test) = data.mnist_split()
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(y_test).tolist() == [100] * 10
    with pytest.raises(ValueError):
        x_train[0, 0, 0, 0] = 1.0
    assert data.mnist_split()[0][0] is x_train


def test_eval_set_limits_spread_over_the_split():
    evalset = data.eval_set("mnist", limit=50)
    assert evalset.size == 50 and np.bincount(evalset.labels).tolist() == [5] * 10
    batches = list(evalset.batches(16))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert data.spread(10, 4).tolist() == [0, 2, 5, 7] and data.spread(3, 5).tolist() == [0, 1, 2]


def test_unknown_dataset_and_missing_data_dir_are_config_errors():
    with pytest.raises(ConfigError, match="unknown data set 'svhn'"):
        data.dataset_info("svhn")
    with pytest.raises(ConfigError, match="--data-dir"):
        data.data_dir_for("imagenet")


def test_record_file_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"cifar10_test\.rec: no such RecordIO file"):
        data.record_file("cifar10", tmp_path, "test")


# ---------------------------------------------------------------------- the shared CIFAR-10 files
def _cifar10():
    folder = data.default_cifar10_dir()
    if folder is None:
        pytest.skip("CIFAR-10 RecordIO not found in ../shared/data/cifar10")
    return folder


def test_num_eval_spreads_over_a_class_sorted_cifar10_split():
    folder = _cifar10()
    evalset = data.eval_set("cifar10", folder, limit=40)
    path = folder / "cifar10_test.rec"
    keep = np.arange(40) * 10000 // 40
    assert np.bincount(evalset.labels, minlength=10).tolist() == [4] * 10
    np.testing.assert_array_equal(evalset.labels, data.record_labels(path)[keep])
    np.testing.assert_allclose(evalset.images[-3:], data.read_records(path, keep[-3:], "cifar10"), atol=1e-5)


def test_cifar10_calibration_records_are_the_evaluation_preprocessing():
    """Records decoded by hand for calibration equal what the RecordIO iterator yields."""
    folder = _cifar10()
    images, labels = data.cifar10_arrays(folder, "test", limit=20)
    path = folder / "cifar10_test.rec"
    decoded = data.read_records(path, [0, 3, 19], "cifar10")
    np.testing.assert_allclose(decoded, images[[0, 3, 19]], atol=1e-5)
    assert np.array_equal(data.record_labels(path)[:20], labels)


def test_cifar10_calibration_subset_draws_from_the_whole_training_split():
    folder = _cifar10()
    images = data.calibration_subset("cifar10", folder, per_class=2, seed=7)
    labels = data.record_labels(folder / "cifar10_train.rec")
    keep = data.class_balanced_subset(labels, 2, seed=7)
    assert images.shape == (20, 3, 32, 32) and keep.max() > 10000  # not only the first images
    np.testing.assert_array_equal(images, data.read_records(folder / "cifar10_train.rec", keep, "cifar10"))
