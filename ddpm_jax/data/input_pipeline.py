"""Training and evaluation batches: shuffled, sharded over processes, exactly resumable.

A *source* is anything with `__len__` and `read(indices) -> uint8 [n, H, W, C]`
(and `read_labeled(indices) -> (images, int32 labels [n])` for `load_labeled`):
images held in memory, decoded once from a TFDS split or read from a folder
of the user's images, so that a batch is an array gather and input never
holds back the accelerator; or, for a TFDS split too large for that
(config.data.in_memory_max_bytes), its ArrayRecord files read by random
access, batches decoded ahead by Grain's worker processes (`streaming`).

The training batch at a step is a pure function of (seed, step): epoch
`step // steps_per_epoch` is a permutation drawn from (seed, epoch), the
global batch is the step's slice of it (the remainder of an epoch is
dropped), and process p of P reads only the p-th contiguous part of that
batch. So a run resumed at step k sees exactly the batches of an
uninterrupted run, whatever the number of processes, and the iterator's
whole state is the next step number.
"""

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np

from ddpm_jax.data import datasets

# Stream tags keep the permutation and flip generators apart although both are seeded by ints.
_PERMUTATION_STREAM, _FLIP_STREAM = 0, 1


class Source(Protocol):
    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 images [len(indices), H, W, C], in the order of `indices`."""

    def read_labeled(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """`read(indices)` and the int32 class labels [len(indices)] of the same images."""


class ArraySource:
    """Images (uint8 [N, H, W, C]) and optional labels held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels ({len(labels)}) and images ({len(images)}) differ in length")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]

    def read_labeled(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        if self.labels is None:
            raise ValueError("this source has no labels (a folder of images has them only "
                             "from class subfolders, with folder_labels=True)")
        indices = np.asarray(indices, dtype=np.int64)
        return self.images[indices], self.labels[indices].astype(np.int32)


# Splits whose decoded images fit in this many bytes are decoded into memory at start.
IN_MEMORY_MAX_BYTES = 1 << 30


@lru_cache(maxsize=4)
def _decode_tfds_split(source: datasets.TfdsSource) -> ArraySource:
    """A TFDS split's images and labels decoded into memory once per process, shared read-only.

    Read by random access instead, each batch would decode its PNGs one
    record at a time in Python, slower than one GPU trains (BENCHMARKS.md,
    "Input pipeline"). Decoding a split once (PNG, lossless, with PIL: ~4 s
    for Fashion-MNIST's 60,000) makes every batch an array gather, and the
    evaluator or a second run in the same process reuses it.
    """
    everything = np.arange(len(source))
    if source.label_key is None:
        images, labels = source.read(everything), None
    else:
        images, labels = source.read_labeled(everything)
        labels.flags.writeable = False
    images.flags.writeable = False  # shared by the cache
    return ArraySource(images, labels)


def open_source(dataset: str, split: str = "train", *, image_size: int, channels: int,
                data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None,
                folder: str | os.PathLike | None = None, allow_download: bool = True,
                image_key: str = "image", in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
                split_field: str = "split", folder_labels: bool = False,
                converted_data_dir: str | os.PathLike | None = None) -> Source:
    """The `split` of `dataset` as a source of image_size^2 x channels images.

    dataset: any TFDS name ('cifar10', 'lsun/church_outdoor', 'imagenet_resized/64x64', a
      builder prepared in data_dir), or 'folder' for every image under `folder` (one
      'train' split; labels only with `folder_labels`, from the class subfolders,
      `datasets.folder_labels`). TFDS datasets are prepared on first use (see
      `datasets.prepare_tfds` for data_dir, manual_dir, allow_download and
      converted_data_dir); `image_key` names
      their image feature, `split` is a TFDS split string ('train[:90%]'). Images of another
      size or mode are converted, resized and center-cropped like a folder's.
    A TFDS split whose decoded images take at most `in_memory_max_bytes` is decoded into
    memory once (an ArraySource); a larger one is a `datasets.TfdsSource`, read from disk
    by random access (streamed by `streaming.StreamIterator`). Errors name the config field
    (`split_field` for the split) and list what exists.
    """
    if dataset == "folder":
        if split != "train":
            raise ValueError(f"split={split!r}: a folder dataset has only the 'train' split")
        if not folder:
            raise ValueError("dataset 'folder' needs the image directory (config.data.folder)")
        paths = datasets.image_paths(folder)
        labels = datasets.folder_labels(folder, paths) if folder_labels else None
        images, skipped = datasets.load_folder(folder, image_size, channels)
        if labels is not None:  # the labels of the images that could be read
            skipped = set(skipped)
            labels = labels[np.asarray([p not in skipped for p in paths], bool)]
        return ArraySource(images, labels)
    builder = datasets.prepare_tfds(dataset, data_dir=data_dir, manual_dir=manual_dir,
                                    allow_download=allow_download,
                                    converted_data_dir=converted_data_dir)
    source = datasets.tfds_source(builder, split, image_key=image_key, image_size=image_size,
                                  channels=channels, split_field=split_field)
    return _decode_tfds_split(source) if source.decoded_bytes <= in_memory_max_bytes else source


def open_config_source(data, split: str, split_field: str, folder_labels: bool = False
                       ) -> Source:
    """`open_source` of `split` of the dataset that config.data (`data`) describes."""
    return open_source(
        data.dataset, split, image_size=data.image_size, channels=data.channels,
        data_dir=data.tfds_data_dir or None, manual_dir=data.manual_dir or None,
        folder=data.folder or None, image_key=data.image_key,
        in_memory_max_bytes=data.in_memory_max_bytes,
        split_field=split_field, folder_labels=folder_labels,
        converted_data_dir=data.converted_data_dir or None)


def describe(source: Source, data, split: str, num_classes: int = 0) -> str:
    """One console line on what a run reads from config.data (`data`) and how, for the user
    to check before the compile: dataset, split, images, their shape, classes, memory or disk."""
    name = f"folder {data.folder}" if data.dataset == "folder" else data.dataset
    shape = f"{data.image_size}x{data.image_size}x{data.channels}"
    classes = f", {num_classes} classes" if num_classes else ""
    if isinstance(source, datasets.TfdsSource):
        workers = data.get("worker_count", 0)
        how = (f"streamed from disk by {workers} Grain worker process(es)" if workers else
               "streamed from disk by a thread")
        limit = data.get("in_memory_max_bytes", IN_MEMORY_MAX_BYTES)
        size = f"{_size(source.decoded_bytes)} decoded > in_memory_max_bytes {_size(limit)}"
    else:
        how, size = "decoded into memory", _size(source.images.nbytes)
    return f"Data: {name} {split!r}, {len(source):,} images as {shape}{classes}; {how} ({size})"


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else
            f"{num_bytes / 2**20:.0f} MiB")


def has_labels(source: Source) -> bool:
    """Whether `source.read_labeled` has labels to return (an in-memory or a streamed split)."""
    return (getattr(source, "labels", None) is not None
            or getattr(source, "label_key", None) is not None)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [-1, 1], as the design's ToTensor() then t * 2 - 1."""
    return images.astype(np.float32) / 255 * 2 - 1


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive")
    if num_examples < global_batch_size:
        raise ValueError(f"global_batch_size={global_batch_size} exceeds the dataset's "
                         f"{num_examples} examples")
    return num_examples // global_batch_size


@lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(num_examples)
    perm.flags.writeable = False  # shared by the cache
    return perm


def global_batch_indices(num_examples: int, global_batch_size: int, seed: int, step: int
                         ) -> np.ndarray:
    """Dataset indices of the global batch at `step` (int64 [global_batch_size])."""
    _check_seed_step(seed, step)
    spe = steps_per_epoch(num_examples, global_batch_size)
    start = (step % spe) * global_batch_size
    return _permutation(num_examples, seed, step // spe)[start:start + global_batch_size]


def flip_mask(global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Which images of the global batch at `step` are flipped (bool, each with probability 1/2)."""
    _check_seed_step(seed, step)
    return np.random.default_rng([seed, _FLIP_STREAM, step]).random(global_batch_size) < 0.5


def local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The contiguous part of the global batch that process `process_index` reads."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def train_images(source: Source, global_batch_size: int, seed: int, step: int, *,
                 random_flip: bool, process_index: int = 0, process_count: int = 1,
                 with_labels: bool = False):
    """This process's part of the training batch at `step` as read and flipped: uint8, and
    with `with_labels` also its int32 labels, as (images, labels)."""
    part = local_slice(global_batch_size, process_index, process_count)
    indices = global_batch_indices(len(source), global_batch_size, seed, step)[part]
    images, labels = source.read_labeled(indices) if with_labels else (source.read(indices), None)
    if random_flip:
        flip = flip_mask(global_batch_size, seed, step)[part]
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return (images, labels) if with_labels else images


def train_batch(source: Source, global_batch_size: int, seed: int, step: int, *,
                random_flip: bool, process_index: int = 0, process_count: int = 1,
                with_labels: bool = False):
    """This process's part of the training batch at `step`: float32 [GB / P, H, W, C] in [-1, 1],
    with `with_labels` a tuple (images, int32 labels [GB / P])."""
    batch = train_images(source, global_batch_size, seed, step, random_flip=random_flip,
                         process_index=process_index, process_count=process_count,
                         with_labels=with_labels)
    return (to_float(batch[0]), batch[1]) if with_labels else to_float(batch)


def _check_seed_step(seed: int, step: int) -> None:
    if seed < 0:
        raise ValueError(f"seed={seed} must be non-negative")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative")


class TrainIterator:
    """Endless `train_batch`es from `start_step` on, read ahead by a background thread
    (with `with_labels`, (images, labels) pairs).

    `next_step` is the step of the batch the next `next()` returns: save it
    with the training state and pass it back as `start_step` to resume.
    Call `close()` (or use `with`) to stop the thread; it is a daemon thread,
    so a forgotten iterator never keeps the program alive.
    """

    def __init__(self, source: Source, global_batch_size: int, seed: int, *, random_flip: bool,
                 start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2, with_labels: bool = False):
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch} must be at least 1")
        # Validates every argument here rather than in the thread.
        global_batch_indices(len(source), global_batch_size, seed, start_step)
        local_slice(global_batch_size, process_index, process_count)
        self.next_step = start_step
        self._batch = lambda step: train_batch(
            source, global_batch_size, seed, step, random_flip=random_flip,
            process_index=process_index, process_count=process_count, with_labels=with_labels)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True,
                                        name="TrainIterator")
        self._thread.start()

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = self._batch(step)
            except Exception as e:  # handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            step += 1

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> np.ndarray:
        if self._stop.is_set():
            raise RuntimeError("TrainIterator is closed")
        item = self._queue.get()
        if isinstance(item, Exception):
            self.close()
            raise item
        self.next_step += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_batches(source: Source, batch_size: int, num_examples: int | None = None
                 ) -> Iterator[np.ndarray]:
    """The first `num_examples` images (default all) in order, float32 [-1, 1], unflipped.

    Batches have `batch_size` images except the last, which holds the rest.
    """
    for indices in _ordered_batches(len(source), batch_size, num_examples):
        yield to_float(source.read(indices))


def load_labeled(source: Source, num_examples: int | None = None, batch_size: int = 1000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_examples` images (default all) as float32 [-1, 1] and their int32 labels."""
    images, labels = [], []
    for indices in _ordered_batches(len(source), batch_size, num_examples):
        batch_images, batch_labels = source.read_labeled(indices)
        images.append(to_float(batch_images))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _ordered_batches(size: int, batch_size: int, num_examples: int | None) -> Iterator[np.ndarray]:
    n = size if num_examples is None else num_examples
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not 0 < n <= size:
        raise ValueError(f"num_examples={num_examples} must be in [1, {size}]")
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))
