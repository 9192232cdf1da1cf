"""The input pipeline on the real Fashion-MNIST files: shapes, range, flips, order, shards, resume."""
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_jax.data import datasets, input_pipeline as ip

GB = 128


@pytest.fixture(scope="module")
def train(fashion_mnist_dirs):
    return ip.open_source("fashion_mnist", "train", image_size=28, channels=1,
                          data_dir=fashion_mnist_dirs.data_dir, allow_download=False)


@pytest.fixture(scope="module")
def test_split(fashion_mnist_dirs):
    return ip.open_source("fashion_mnist", "test", image_size=28, channels=1,
                          data_dir=fashion_mnist_dirs.data_dir, allow_download=False)


class RecordingSource:
    """Wraps a source and records the indices of every read."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def __len__(self):
        return len(self.source)

    def read(self, indices):
        self.reads.append(np.asarray(indices).tolist())
        return self.source.read(indices)


def take(iterator, n):
    with iterator:
        return [next(iterator) for _ in range(n)]


def test_shapes_and_range(train, test_split):
    assert (len(train), len(test_split)) == (60000, 10000)
    batch = ip.train_batch(train, GB, seed=0, step=0, random_flip=True)
    assert batch.shape == (GB, 28, 28, 1) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() == 1.0  # both ends reached exactly
    # Pixel v maps to the design's ToTensor() then t * 2 - 1, bit for bit.
    levels = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(levels).float().div(255) * 2 - 1
    np.testing.assert_array_equal(ip.to_float(levels), want.numpy())
    assert np.isin(batch, want.numpy()).all()
    # Labels with the pixels: Fashion-MNIST's test split has 1000 images of each class.
    images, labels = ip.load_labeled(test_split)
    assert images.shape == (10000, 28, 28, 1) and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


def test_split_decoded_in_memory_equals_tfds_records(fashion_mnist_dirs, train):
    """The split decoded once with PIL holds TFDS's own decoded records, index for index."""
    builder = datasets.prepare_tfds("fashion_mnist", data_dir=fashion_mnist_dirs.data_dir,
                                    allow_download=False)
    records = builder.as_data_source(split="train")
    indices = np.random.default_rng(0).choice(len(records), 300, replace=False)
    indices = np.concatenate([[0, len(records) - 1], indices])
    want = records.__getitems__(indices.tolist())
    images, labels = train.read_labeled(indices)
    np.testing.assert_array_equal(images, np.stack([r["image"] for r in want]))
    np.testing.assert_array_equal(labels, [r["label"] for r in want])
    assert images.std() > 50  # real pixels, not a blank decode


def test_about_half_of_the_images_are_flipped(train):
    flipped = same = 0
    for step in range(4):
        plain = ip.train_batch(train, GB, seed=3, step=step, random_flip=False)
        batch = ip.train_batch(train, GB, seed=3, step=step, random_flip=True)
        mirror = plain[:, :, ::-1]
        is_plain = (batch == plain).all(axis=(1, 2, 3))
        is_mirror = (batch == mirror).all(axis=(1, 2, 3))
        assert (is_plain | is_mirror).all()  # each image is its original or its mirror image
        flipped += int((is_mirror & ~is_plain).sum())
        same += int((is_plain & ~is_mirror).sum())
    assert 0.4 < flipped / (flipped + same) < 0.6, (flipped, same)


def test_same_seed_and_step_give_the_same_batch(train):
    first = take(ip.TrainIterator(train, GB, seed=5, random_flip=True), 3)
    again = take(ip.TrainIterator(train, GB, seed=5, random_flip=True), 3)
    for step, (a, b) in enumerate(zip(first, again)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, ip.train_batch(train, GB, 5, step, random_flip=True))
    assert not np.array_equal(first[0], first[1])
    other_seed = ip.train_batch(train, GB, seed=6, step=0, random_flip=True)
    assert not np.array_equal(first[0], other_seed)


def test_resume_sees_the_batches_of_an_uninterrupted_run(train):
    # On the TFDS source, and across an epoch boundary on 1000 real images (15 steps an epoch).
    full = take(ip.TrainIterator(train, GB, seed=1, random_flip=True), 5)
    resumed = ip.TrainIterator(train, GB, seed=1, random_flip=True, start_step=2)
    assert resumed.next_step == 2
    got = take(resumed, 3)
    assert resumed.next_step == 5
    for a, b in zip(full[2:], got):
        np.testing.assert_array_equal(a, b)

    small = ip.ArraySource(train.read(np.arange(1000)))
    full = take(ip.TrainIterator(small, 64, seed=1, random_flip=True), 21)
    got = take(ip.TrainIterator(small, 64, seed=1, random_flip=True, start_step=13), 8)
    for a, b in zip(full[13:], got):
        np.testing.assert_array_equal(a, b)


def test_processes_read_disjoint_shards_that_make_the_global_batch(train):
    whole = take(ip.TrainIterator(train, GB, seed=2, random_flip=True, start_step=7), 2)
    parts, read = [], []
    for p in range(4):
        source = RecordingSource(train)
        parts.append(take(ip.TrainIterator(source, GB, seed=2, random_flip=True, start_step=7,
                                           process_index=p, process_count=4, prefetch=1), 2))
        read.append(source.reads)
    for step in range(2):
        np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), whole[step])
        assert all(part[step].shape == (GB // 4, 28, 28, 1) for part in parts)
    # Each read of process p (one a step, from step 7 on, the prefetcher running ahead) is
    # its own quarter of the step's global batch and nothing else.
    for p in range(4):
        assert len(read[p]) >= 2
        for k, indices in enumerate(read[p]):
            want = ip.global_batch_indices(len(train), GB, 2, 7 + k)[p * 32:(p + 1) * 32]
            assert indices == want.tolist()
    first_two = [set(read[p][0] + read[p][1]) for p in range(4)]
    assert len(set().union(*first_two)) == 4 * 2 * 32
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        ip.TrainIterator(train, GB, seed=2, random_flip=True, process_index=0, process_count=3)


def test_every_image_is_seen_once_per_epoch():
    spe = ip.steps_per_epoch(60000, GB)
    assert spe == 468  # 96 images left over each epoch
    epochs = [np.concatenate([ip.global_batch_indices(60000, GB, 0, s)
                              for s in range(e * spe, (e + 1) * spe)]) for e in (0, 1)]
    for order in epochs:
        assert len(np.unique(order)) == spe * GB
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch is shuffled anew
    # Through the iterator: image i is filled with the value i, 3 batches of 3 per epoch.
    source = ip.ArraySource(np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None],
                                            (10, 2, 2, 1)).copy())
    batches = take(ip.TrainIterator(source, 3, seed=4, random_flip=False), 6)
    seen = [np.rint((b[:, 0, 0, 0] + 1) / 2 * 255).astype(int) for b in batches]
    for epoch in (0, 1):
        ids = np.concatenate(seen[3 * epoch:3 * epoch + 3])
        assert len(set(ids.tolist())) == 9


def test_iterator_stops_its_thread_and_raises_reader_errors(train):
    iterator = ip.TrainIterator(train, GB, seed=0, random_flip=False)
    next(iterator)
    iterator.close()
    assert not [t for t in threading.enumerate() if t.name == "TrainIterator"]
    with pytest.raises(RuntimeError, match="closed"):
        next(iterator)

    class Broken(RecordingSource):
        def read(self, indices):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        take(ip.TrainIterator(Broken(train), GB, seed=0, random_flip=False), 1)
    assert not [t for t in threading.enumerate() if t.name == "TrainIterator"]


def test_eval_batches_are_in_order_and_complete(test_split):
    batches = list(ip.eval_batches(test_split, 3000, num_examples=7000))
    assert [len(b) for b in batches] == [3000, 3000, 1000]
    np.testing.assert_array_equal(np.concatenate(batches),
                                  ip.to_float(test_split.read(np.arange(7000))))
    with pytest.raises(ValueError, match="num_examples=10001"):
        next(ip.eval_batches(test_split, 100, num_examples=10001))


def test_bad_arguments_name_the_field(fashion_mnist_dirs, train):
    with pytest.raises(datasets.DatasetError,
                       match=r"config.data.dataset='fashion_mnis': TFDS has no dataset of that "
                             r"name.*Close matches: \['fashion_mnist'"):
        ip.open_source("fashion_mnis", image_size=28, channels=1,
                       data_dir=fashion_mnist_dirs.data_dir)
    with pytest.raises(datasets.DatasetError, match=r"config.data.dataset='lsun/church_outdor'.*"
                                                    r"church_outdoor"):
        ip.open_source("lsun/church_outdor", image_size=28, channels=1)
    with pytest.raises(datasets.DatasetError, match=r"image_key='pixels'.*image features: "
                                                    r"\['image'\]"):
        ip.open_source("fashion_mnist", image_size=28, channels=1, image_key="pixels",
                       data_dir=fashion_mnist_dirs.data_dir, allow_download=False)
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
        ip.open_source("fashion_mnist", "validation", image_size=28, channels=1,
                       data_dir=fashion_mnist_dirs.data_dir, allow_download=False)
    with pytest.raises(ValueError, match="global_batch_size=60001 exceeds"):
        ip.train_batch(train, 60001, seed=0, step=0, random_flip=False)


def test_training_reports_a_missing_dataset_as_a_config_error(fashion_mnist_dirs):
    from ddpm_jax import config_validation
    from ddpm_jax.training import loop
    from tests.support.train_helpers import tiny_config
    config = tiny_config(fashion_mnist_dirs, data__train_split="train[:110%]")
    with pytest.raises(config_validation.ConfigError,
                       match=r"config.data.train_split='train\[:110%\]' is not a split"):
        loop.open_train_source(config)


def test_other_sizes_and_channels_are_converted_like_a_folder(fashion_mnist_dirs, test_split):
    """Fashion-MNIST at 32x32 RGB: each 28x28 image upsampled and repeated over 3 channels."""
    source = ip.open_source("fashion_mnist", "test[:300]", image_size=32, channels=3,
                            data_dir=fashion_mnist_dirs.data_dir, allow_download=False)
    assert len(source) == 300
    got = source.read(np.arange(3))
    for image, native in zip(got, test_split.read(np.arange(3))):
        want = datasets.to_image_array(Image.fromarray(native[:, :, 0]), 32, 3)
        np.testing.assert_array_equal(image, want)
    assert got.shape == (3, 32, 32, 3) and (got[..., 0] == got[..., 2]).all()


def test_a_bucket_data_dir_reaches_tfds_unchanged(monkeypatch):
    """gs://bucket/tfds is handed to TFDS (which reads it through etils epath) as it is, not
    mangled by pathlib to gs:/bucket/tfds, and preparing it takes a local lock."""
    seen, prepared = [], []

    class Builder:
        name, data_dir = "cifar10", "gs://bucket/tfds/cifar10/3.0.2"

        def is_prepared(self):
            return bool(prepared)

    def builder(name, data_dir, file_format=datasets.ARRAY_RECORD):
        seen.append(data_dir)
        return Builder()

    monkeypatch.setattr(datasets, "_builder", builder)
    monkeypatch.setattr(datasets, "_prepare", lambda b, name, *_: prepared.append(name))
    datasets.prepare_tfds("cifar10", data_dir="gs://bucket/tfds", allow_download=False)
    assert seen == ["gs://bucket/tfds"] * 2 and prepared == ["cifar10"]


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_skips_and_counts_corrupt_images(tmp_path, train, caplog):
    originals = train.read(np.arange(5))
    for i, image in enumerate(originals):
        write_png(tmp_path / ("nested" if i % 2 else "") / f"img{i}.png", image[:, :, 0])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "nested" / "truncated.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image, ignored")

    with caplog.at_level(logging.WARNING, logger=datasets.__name__):
        source = ip.open_source("folder", image_size=28, channels=1, folder=tmp_path)
    assert "Skipped 2 unreadable image file(s) of 7" in caplog.text
    assert str(tmp_path / "broken.png") in caplog.text
    # Sorted by path: img0, img2, img4, nested/img1, nested/img3; unchanged at 28x28.
    np.testing.assert_array_equal(source.read(np.arange(5)), originals[[0, 2, 4, 1, 3]])
    images, skipped = datasets.load_folder(tmp_path, 28, 3)
    assert images.shape == (5, 28, 28, 3) and len(skipped) == 2
    np.testing.assert_array_equal(images[..., 2], originals[[0, 2, 4, 1, 3], :, :, 0])

    empty = tmp_path / "nothing_readable"
    empty.mkdir()
    (empty / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(FileNotFoundError, match="no readable image.*1 of them unreadable"):
        datasets.load_folder(empty, 28, 1)


@pytest.mark.parametrize("size", [(100, 20), (20, 100)])
def test_folder_images_are_resized_then_center_cropped(size):
    # A white band, one fifth of the long side, across the middle of a black image.
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    if w > h:
        array[:, 40:60] = 255
    else:
        array[40:60, :] = 255
    out = np.asarray(datasets.resize_and_center_crop(Image.fromarray(array), 10))
    assert out.shape == (10, 10, 3)
    # Resized to 50x10, the band is 10 pixels wide and fills the central crop; only the
    # antialiasing blurs its edges.
    inner = out[:, 2:8] if w > h else out[2:8, :]
    assert (inner == 255).all() and out.mean() > 200


def test_missing_data_names_the_files_and_the_directory(tmp_path, monkeypatch):
    empty = tmp_path / "manual"
    empty.mkdir()
    with pytest.raises(datasets.MissingDataError) as info:
        datasets.prepare_tfds("mnist", data_dir=tmp_path / "tfds", manual_dir=empty,
                              allow_download=False)
    message = str(info.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert str(empty) in message and "DDPM_JAX_MANUAL_DIR" in message
    assert "config.data.manual_dir" in message

    # No manual directory anywhere and no network: the same error, at once.
    monkeypatch.delenv(datasets.MANUAL_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "_reachable", lambda url: False)
    with pytest.raises(datasets.MissingDataError, match="cifar-10-binary.tar.gz.*no manual dir"):
        datasets.prepare_tfds("cifar10", data_dir=tmp_path / "tfds")


def test_wrong_files_are_rejected_by_checksum(tmp_path, fashion_mnist_dirs):
    # Fashion-MNIST's files carry MNIST's names: TFDS verifies them and refuses.
    manual = tmp_path / "manual" / "mnist"
    manual.mkdir(parents=True)
    for f in datasets.official_files("mnist"):
        (manual / f).symlink_to(fashion_mnist_dirs.manual_dir / f)
    assert datasets.resolve_manual_dir("mnist", tmp_path / "manual") == manual
    with pytest.raises(datasets.MissingDataError, match="(?s)not its official file.*wrong checksum"):
        datasets.prepare_tfds("mnist", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                              allow_download=False)
