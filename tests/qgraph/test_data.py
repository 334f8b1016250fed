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


# ---------------------------------------------------------------------- training shards
def test_worker_shares_are_equal_disjoint_and_cover_the_split():
    (images, labels), _ = data.mnist_split()
    shards = [data.train_shard("mnist", None, 4, part) for part in range(4)]
    assert [len(s.labels) for s in shards] == [1000] * 4
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), labels)


def test_an_epoch_reads_every_image_of_a_share_once_in_an_order_fixed_by_seed_epoch_and_share():
    shard = data.train_shard("mnist", None, 2, 1)
    index_of = {image.tobytes(): i for i, image in enumerate(shard.images)}

    def order(epoch, seed=0, drop_last=False, share=shard):
        batches = list(share.batches(epoch, 300, seed, drop_last))
        return [index_of[x.tobytes()] for batch, _ in batches for x in batch.asnumpy()], batches

    first, batches = order(0)
    assert sorted(first) == list(range(2000)) and [len(b) for b, _ in batches] == [300] * 6 + [200]
    assert shard.steps(300) == 7 and shard.steps(300, drop_last=True) == 6 and len(order(0, drop_last=True)[0]) == 1800
    np.testing.assert_array_equal(batches[0][1].asnumpy(), shard.labels[first[:300]])
    assert order(0)[0] == first  # the same again: resuming replays it
    assert order(1)[0] != first and order(0, seed=1)[0] != first
    other = data.train_shard("mnist", None, 2, 0)
    assert not np.array_equal(next(other.batches(0, 300))[0].asnumpy(), batches[0][0].asnumpy())


def test_a_worker_count_that_does_not_divide_the_split_is_a_config_error():
    assert data.check_parts("mnist", None, 8) == 500
    with pytest.raises(ConfigError, match="the 4000 mnist training images do not split evenly over 3 workers: "
                                          r"use a worker count that divides 4000 \(2, 4, 5, 8, 10, 16, ...\)"):
        data.train_shard("mnist", None, 3, 0)


@pytest.mark.parametrize("fill", [0, None], ids=["black", "default"])
def test_random_crop_flip_takes_a_padded_crop_of_every_image_flipped_or_not(fill):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (16, 3, 6, 5)).astype(np.uint8)
    kwargs = {} if fill is None else {"fill": fill}
    out = data.random_crop_flip(images, np.random.default_rng(1), pad=2, **kwargs)
    assert out.shape == images.shape and out.dtype == np.uint8
    flips = 0
    for image, crop in zip(images, out):
        padded = np.pad(image, ((0, 0), (2, 2), (2, 2)), constant_values=255 if fill is None else fill)
        candidates = {(dy, dx, flip): padded[:, dy:dy + 6, dx:dx + 5][:, :, ::-1 if flip else 1]
                      for dy in range(5) for dx in range(5) for flip in (False, True)}
        found = [key for key, candidate in candidates.items() if np.array_equal(candidate, crop)]
        assert found, "not a crop of the padded image"
        flips += found[0][2]
    assert 0 < flips < 16


def test_default_pad_fill_is_the_one_mxnet_image_record_iter_pads_with(tmp_path):
    """The shipped CIFAR-10 models were trained on ImageRecordIter's pad-4 crops: fine-tuning
    must pad with the same colour. A constant image shows which value MXNet fills with."""
    path = tmp_path / "constant.rec"
    writer = mx.recordio.MXRecordIO(str(path), "w")
    image = np.full((8, 8, 3), 7, np.uint8)
    for label in range(16):
        writer.write(mx.recordio.pack_img(mx.recordio.IRHeader(0, float(label), label, 0), image, img_fmt=".png"))
    writer.close()
    batch = next(iter(mx.io.ImageRecordIter(path_imgrec=str(path), data_shape=(3, 8, 8), batch_size=16, pad=4,
                                            rand_crop=True, shuffle=False, seed=3, preprocess_threads=1)))
    values = set(np.unique(batch.data[0].asnumpy()).tolist())
    assert values == {7.0, float(data.PAD_FILL)}


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


def test_a_cifar10_share_holds_its_records_decoded_as_the_iterator_does():
    folder = _cifar10()
    shard = data.train_shard("cifar10", folder, 2, 1)
    assert shard.images.shape == (25000, 3, 32, 32) and shard.images.dtype == np.uint8
    path = folder / "cifar10_train.rec"
    info = data.CIFAR10
    np.testing.assert_allclose(data.normalise(shard.images[[0, 7]], info.mean, info.std),
                               data.read_records(path, [25000, 25007], "cifar10"), atol=1e-5)
    np.testing.assert_array_equal(shard.labels, data.record_labels(path)[25000:])
    batch, labels = next(shard.batches(0, 64, seed=3))
    assert batch.shape == (64, 3, 32, 32) and labels.shape == (64,)
    assert abs(float(batch.mean().asscalar())) < 0.5  # normalised (padding included)
