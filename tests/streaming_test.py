"""A TFDS split larger than config.data.in_memory_max_bytes, streamed by Grain.

On a dataset built here (tests/support/tiny_tfds.py: 2,000 non-square 40x48 RGB images
with labels), opened by name from its data directory with the threshold
lowered so that it streams.
"""
import signal

import jax
import numpy as np
import pytest

from ddpm_jax.data import datasets, input_pipeline as ip, streaming
from ddpm_jax.training import loop
from tests.support import tiny_tfds
from tests.support.train_helpers import (enable_compilation_cache, losses, restored_state, run_train_py,
                                 sigterm_at, subprocess_env, tiny_config, train_py)

SIZE, GB = 16, 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    tiny_tfds.prepare(directory)
    return directory


def open_split(data_dir, split="train", streamed=True, size=SIZE, channels=3):
    return ip.open_source(tiny_tfds.NAME, split, image_size=size, channels=channels,
                          data_dir=data_dir, in_memory_max_bytes=0 if streamed else 1 << 30)


def take(iterator, n):
    with iterator:
        return [next(iterator) for _ in range(n)]


def test_streamed_batches_equal_the_in_memory_batches(data_dir):
    streamed, in_memory = open_split(data_dir), open_split(data_dir, streamed=False)
    assert isinstance(streamed, datasets.TfdsSource) and isinstance(in_memory, ip.ArraySource)
    assert len(streamed) == len(in_memory) == 2000
    assert streamed.decoded_bytes == 2000 * SIZE * SIZE * 3
    # Across the epoch boundary (31 steps an epoch), resumed at step 29, in a thread and in
    # 2 Grain worker processes.
    want = take(ip.TrainIterator(in_memory, GB, seed=3, random_flip=True, start_step=29), 4)
    for workers in (0, 2):
        iterator = streaming.StreamIterator(streamed, GB, seed=3, random_flip=True,
                                            start_step=29, worker_count=workers)
        got = take(iterator, 4)
        assert iterator.next_step == 33
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(want[0], want[1])
    # Labels travel with their images (for the class-conditional model): record i has i % 10.
    images, labels = take(streaming.StreamIterator(streamed, GB, seed=3, random_flip=True,
                                                   start_step=29, with_labels=True), 1)[0]
    np.testing.assert_array_equal(images, want[0])
    indices = ip.global_batch_indices(2000, GB, 3, 29)
    np.testing.assert_array_equal(labels, indices % 10)
    np.testing.assert_array_equal(labels, in_memory.read_labeled(indices)[1])


@pytest.mark.parametrize("channels", [3, 1])
def test_resize_and_crop_equal_the_folder_transform(data_dir, tmp_path, channels):
    """40x48 images to 16x16 (and RGB to grayscale) exactly as a folder of the same images."""
    from PIL import Image
    for i in range(40):
        Image.fromarray(tiny_tfds.image(i)).save(tmp_path / f"img_{i:04d}.png")
    folder = ip.open_source("folder", image_size=SIZE, channels=channels, folder=tmp_path)
    streamed = open_split(data_dir, channels=channels)
    got = streamed.read(np.arange(40))
    assert got.shape == (40, SIZE, SIZE, channels)
    np.testing.assert_array_equal(got, folder.read(np.arange(40)))
    # Really resized: the 16x16 crop of the 19x16 image, not a corner of the original.
    assert not np.array_equal(got[0, :, :, 0], tiny_tfds.image(0)[:SIZE, :SIZE, 0])


def test_two_processes_read_disjoint_halves_of_the_one_process_batch(data_dir):
    streamed = open_split(data_dir)
    whole = take(streaming.StreamIterator(streamed, GB, seed=1, random_flip=True,
                                          start_step=5), 2)
    halves = [take(streaming.StreamIterator(streamed, GB, seed=1, random_flip=True,
                                            start_step=5, process_index=p, process_count=2), 2)
              for p in (0, 1)]
    for step in range(2):
        assert halves[0][step].shape == (GB // 2, SIZE, SIZE, 3)
        np.testing.assert_array_equal(np.concatenate([h[step] for h in halves]), whole[step])
        indices = ip.global_batch_indices(len(streamed), GB, 1, 5 + step)
        assert not set(indices[:GB // 2]) & set(indices[GB // 2:])


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_and_resume_on_the_streaming_path_is_bitwise_uninterrupted(
        data_dir, fashion_mnist_dirs, tmp_path):
    """The reference streams in a thread of this process; train.py with 1 Grain worker process
    opens the dataset read-only by name (its builder class is not registered there), and the
    signal goes to its whole process group, as Ctrl-C in a terminal does."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, data__dataset=tiny_tfds.NAME,
                         data__tfds_data_dir=str(data_dir), data__image_size=SIZE,
                         data__channels=3, data__in_memory_max_bytes=0, data__worker_count=0,
                         training__num_train_steps=12, training__log_every=1,
                         training__checkpoint_every=4)
    reference = loop.train(config, str(tmp_path / "reference"))
    assert reference.step == 12
    config.data.worker_count = 1
    workdir = tmp_path / "run"
    env = subprocess_env()
    process = train_py(config, workdir, env, start_new_session=True)
    output = sigterm_at(process, "step 5/")  # the Grain worker gets it too, and ignores it
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = int(output.split("Stopped at step ")[1].split(":")[0])
    assert 5 <= stopped < 12
    resumed = run_train_py(config, workdir, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from step {stopped} to 12" in resumed.stdout
    state, step = restored_state(workdir, config)
    assert step == 12
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.tree.map(np.asarray,
                                                                        reference.state))):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert losses(workdir) == losses(tmp_path / "reference")


def test_missing_image_key_and_split_name_the_field_and_what_exists(data_dir):
    with pytest.raises(datasets.DatasetError,
                       match=r"config.data.image_key='img'.*image features: \['image'\].*"
                             r"label \(ClassLabel\)"):
        ip.open_source(tiny_tfds.NAME, image_size=SIZE, channels=3, data_dir=data_dir,
                       image_key="img")
    with pytest.raises(datasets.DatasetError,
                       match=r"config.data.train_split='validation' is not a split of "
                             r"'ddpm_test_images'; choose one of \['test', 'train'\]"):
        ip.open_source(tiny_tfds.NAME, "validation", image_size=SIZE, channels=3,
                       data_dir=data_dir, split_field="config.data.train_split")
    # A TFDS slice is a split.
    assert len(open_split(data_dir, "train[:90%]")) == 1800
