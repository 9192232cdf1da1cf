"""Where the training images come from: any TFDS image dataset, or a folder.

TFDS datasets are prepared once per data directory in ArrayRecord format, so
that reading them later needs neither TensorFlow nor tf.data (preparing does
need TensorFlow); the data directory may be a bucket (gs://...), which TFDS
reads through etils epath. A dataset already prepared in another format (TFDS's
default, tfrecord, which has no random access) is converted once to ArrayRecord
by TFDS's own conversion, next to its files or into a configured directory. A
dataset TFDS does not register (the user's own builder) is opened read-only by
name from the data directory it was prepared into. TFDS's own builders take the official files from a manual directory,
verify their checksums and never download them; with no files and no network
this module fails at once with an error naming the files, instead of TFDS
retrying its downloads for minutes.

Every image, from a TFDS record or from a folder of the user's own images,
goes through `to_image_array`: converted to grayscale or RGB, resized and
center-cropped as the design document's torchvision transforms do.

tensorflow_datasets is imported only where a dataset is prepared or opened, so
that training on in-memory or synthetic data (benchmarks, accelerators without
TFDS installed) does not need it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import io
import logging
import os
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from etils import epath
from PIL import Image

from ddpm_jax.runtime import storage

if TYPE_CHECKING:  # the annotations' name; imported for real only where TFDS is used
    import tensorflow_datasets as tfds

# The TFDS datasets that the configs and tests use, each prepared from its official files.
TFDS_DATASETS = ("fashion_mnist", "mnist", "cifar10")
MANUAL_DIR_ENV = "DDPM_JAX_MANUAL_DIR"
ARRAY_RECORD = "array_record"  # the TFDS file format that this module reads by random access
# torchvision ImageFolder's list: the formats PIL reads that hold photos.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_PIL_MODES = {1: "L", 3: "RGB"}

log = logging.getLogger(__name__)


class MissingDataError(FileNotFoundError):
    """The dataset is not prepared and its official files are neither on disk nor downloadable."""


class DatasetError(ValueError):
    """config.data names a dataset, image feature or split that does not exist, or a dataset
    that cannot be read as configured; the message names the field and lists what exists
    or what to set."""


def official_files(name: str) -> dict[str, str]:
    """File name -> download URL of each official file (with a registered checksum) the TFDS
    builder `name` needs; empty for builders that register none."""
    import tensorflow_datasets as tfds
    url_infos = tfds.builder_cls(name.split("/")[0].split(":")[0]).url_infos or {}
    return {info.filename: url for url, info in url_infos.items()}


def resolve_manual_dir(name: str, manual_dir: str | os.PathLike | None = None) -> epath.Path | None:
    """The directory that holds dataset `name`'s official files, or None if none is configured.

    `manual_dir` (else $DDPM_JAX_MANUAL_DIR) may hold the files itself or in a
    subdirectory named after the dataset; mnist and fashion_mnist share file
    names, so one directory can serve both only through such subdirectories.
    """
    root = manual_dir if manual_dir is not None else os.environ.get(MANUAL_DIR_ENV)
    if not root:
        return None
    root = storage.absolute(root)  # the environment variable enters here
    return root / name if (root / name).is_dir() else root


def prepare_tfds(name: str, *, data_dir: str | os.PathLike | None = None,
                 manual_dir: str | os.PathLike | None = None,
                 allow_download: bool = True,
                 converted_data_dir: str | os.PathLike | None = None
                 ) -> tfds.core.DatasetBuilder:
    """The builder of TFDS dataset `name`, prepared in ArrayRecord format under `data_dir`.

    data_dir: TFDS data directory; None means $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    manual_dir: see `resolve_manual_dir`. Official files found there are used
      (checksums verified); missing ones are downloaded only if `allow_download`
      and their server answers, else `MissingDataError` says what to put where.
    converted_data_dir: where a dataset found prepared in data_dir in another format
      (tfrecord) is converted to ArrayRecord; None: next to its files (`_array_record_copy`).
    Preparing happens once per data directory; processes on one machine wait
    for each other through a lock file instead of preparing twice.
    """
    data_dir = _as_str(data_dir)
    builder = _builder(name, data_dir, file_format=None)  # in the format it is prepared in
    if builder.is_prepared():
        if _lists_array_record(builder.info):
            return builder
        return _array_record_copy(builder, name, data_dir, _as_str(converted_data_dir))
    # The lock file is local (tempdir) whatever the data directory: processes of one machine
    # prepare once; the hosts of a pod slice must find a shared bucket already prepared.
    with _machine_lock(f"{builder.data_dir}"):
        builder = _builder(name, data_dir)
        if not builder.is_prepared():
            _prepare(builder, name, resolve_manual_dir(builder.name, manual_dir), allow_download)
    return builder


def _as_str(path: str | os.PathLike | None) -> str | None:
    """`path` as TFDS takes it (the commands resolve ~ and relative paths where they enter,
    `storage.absolute`); a URL (gs://bucket/dir) as it is, which pathlib would mangle."""
    return None if path is None else os.fspath(path)


def _builder(name: str, data_dir: str | None, file_format: str | None = ARRAY_RECORD
             ) -> tfds.core.DatasetBuilder:
    """TFDS's builder of `name` ('dataset[/config][:version]'), or its read-only builder if
    `name` is not registered but prepared in data_dir; DatasetError if neither.
    file_format None opens a prepared dataset in whatever format it was prepared in."""
    import tensorflow_datasets as tfds
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=file_format)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known, n=5)
        raise DatasetError(
            f"config.data.dataset={name!r}: TFDS has no dataset of that name and none is "
            f"prepared under it in the data directory {data_dir or '$TFDS_DATA_DIR'} "
            f"(config.data.tfds_data_dir). Close matches: {close or 'none'}; TFDS's "
            f"{len(known)} datasets: tfds.list_builders(); or 'folder'.") from None
    except ValueError as e:  # a config or version that the dataset does not have
        raise DatasetError(f"config.data.dataset={name!r}: {e}") from None


def _prepare(builder: tfds.core.DatasetBuilder, name: str, manual_dir: epath.Path | None,
             allow_download: bool) -> None:
    import tensorflow_datasets as tfds
    files = official_files(name)
    missing = [f for f in files if manual_dir is None or not (manual_dir / f).is_file()]
    if missing and not (allow_download and all(_reachable(files[f]) for f in missing)):
        raise MissingDataError(_missing_message(name, builder.data_dir, manual_dir, missing))
    from ddpm_jax.runtime import console
    log.info("Preparing TFDS dataset %r into %s (once; TFDS's progress bars with "
             "--verbosity=1)", name, builder.data_dir)
    tfds.display_progress_bar(console.verbose())  # its bars interleave, one per split and stage
    start = time.perf_counter()
    try:
        # TFDS prints two lines of its own (sizes 'Unknown' for manual data): --verbosity=1.
        with (contextlib.nullcontext() if console.verbose()
              else contextlib.redirect_stdout(io.StringIO())):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        log.info("Prepared %r in %.0f s", name, time.perf_counter() - start)
    except AssertionError as e:  # TFDS asserts that a manual-only dataset's directory exists
        instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or ""
        raise MissingDataError(
            f"Dataset {name!r} is built from files downloaded by hand: set "
            f"config.data.manual_dir (or ${MANUAL_DIR_ENV}) to the directory holding them. "
            f"{instructions.strip()}\n({e})") from None
    except tfds.download.download_manager.NonMatchingChecksumError as e:
        raise MissingDataError(
            f"A file given for dataset {name!r} in {manual_dir} is not its official file "
            f"(mnist and fashion_mnist use the same file names: keep each in its own "
            f"subdirectory <manual_dir>/{name}/).\n{e}") from None
    except ImportError as e:
        raise ImportError(f"Preparing TFDS dataset {name!r} needs TensorFlow "
                          f"(pip install tensorflow-cpu); reading it afterwards does not. ({e})") from e


def _missing_message(name: str, data_dir: str, manual_dir: epath.Path | None,
                     missing: list[str]) -> str:
    files = official_files(name)
    where = (f"the manual directory {manual_dir} lacks them" if manual_dir is not None else
             f"no manual directory is set (config.data.manual_dir or ${MANUAL_DIR_ENV})")
    listing = "\n".join(f"  {f}   (from {files[f]})" for f in files)
    return (
        f"Dataset {name!r} is not prepared in {data_dir}, and {len(missing)} of its official "
        f"files cannot be found or downloaded: {', '.join(missing)} ({where}).\n"
        f"Put these files, as downloaded (their checksums are verified):\n{listing}\n"
        f"into a directory DIR (or DIR/{name}/), and set config.data.manual_dir=DIR or the "
        f"environment variable {MANUAL_DIR_ENV}=DIR. They are prepared once into the TFDS data "
        f"directory (config.data.tfds_data_dir or $TFDS_DATA_DIR).")


def _array_record_copy(source: tfds.core.DatasetBuilder, name: str, data_dir: str | None,
                       converted_data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The builder of an ArrayRecord copy of `source`, a dataset prepared in another format,
    converted on first use: next to its files (TFDS then lists ArrayRecord among the
    dataset's formats), or into converted_data_dir/<name>/<config>/<version>.

    In a run of several processes, process 0 converts while the others wait at a
    barrier, then each finds the copy (or, on a disk of its own, converts it
    in turn). Every process reaches the barrier, since a dataset's own format
    stays what it was after a conversion.
    """
    import jax
    from etils import epath

    from ddpm_jax.runtime import parallel
    source_dir = epath.Path(source.data_dir)
    target = (source_dir if converted_data_dir is None
              else epath.Path(converted_data_dir) / source.info.full_name)
    first = jax.process_index() == 0
    if not first:
        parallel.barrier("ddpm_jax_array_record_copy")
    with _machine_lock(os.fspath(target)):
        if not _holds_array_record(target):
            _convert(source, name, source_dir, target)
    if first:
        parallel.barrier("ddpm_jax_array_record_copy")
    return _builder(name, data_dir if converted_data_dir is None else converted_data_dir,
                    file_format=None)


def _lists_array_record(info: tfds.core.DatasetInfo) -> bool:
    """Whether ArrayRecord is the dataset's format or one of its alternative formats."""
    return ARRAY_RECORD in {file_format.value for file_format in info.available_file_formats()}


def _holds_array_record(version_dir: epath.Path) -> bool:
    """Whether a dataset version directory holds a complete ArrayRecord copy: its
    dataset_info.json lists the format, and every shard of every split is there."""
    import tensorflow_datasets as tfds
    if not (version_dir / "dataset_info.json").exists():
        return False
    info = tfds.builder_from_directory(version_dir).info
    return _lists_array_record(info) and all(
        len(split.get_available_shards(file_format=ARRAY_RECORD)) == split.num_shards
        for split in info.splits.values())


def _convert(source: tfds.core.DatasetBuilder, name: str, source_dir: epath.Path,
             target: epath.Path) -> None:
    why = _not_writable(target)
    if why:
        raise DatasetError(
            f"config.data.dataset={name!r} is prepared in {source_dir} in the "
            f"{source.info.file_format.value} format, which cannot be read by random access; "
            f"it is converted once to ArrayRecord, but {target} cannot be written ({why}). "
            f"Set config.data.converted_data_dir to a directory you can write, local or "
            f"gs:// (e.g. --config.data.converted_data_dir=~/tensorflow_datasets_array_record), "
            f"where it is converted on the next run. Or, with write access to {source_dir}, "
            f"convert it there once with TFDS's command (which needs apache-beam): "
            f"tfds convert_format --dataset_version_dir={source_dir} "
            f"--out_file_format={ARRAY_RECORD}")
    examples = sum(split.num_examples for split in source.info.splits.values())
    log.info("Converting TFDS dataset %r (%d examples, %s format) once to ArrayRecord, "
             "into %s", name, examples, source.info.file_format.value, target)
    start = time.perf_counter()
    # TFDS 4.9.10 counts a copy's shards in the source directory, so it finds none there and
    # would fail: convert without its checks (a failed shard is still logged) and check the
    # copy here. Its check's messages are dropped: they are wrong, and a copy that lacks a
    # shard is an error below. One worker: TFDS's thread pool drops exceptions.
    absl_logger = logging.getLogger("absl")
    wrong = lambda record: not str(record.msg).startswith(  # noqa: E731
        ("Amount of converted shards", "('Found "))
    absl_logger.addFilter(wrong)
    try:
        _convert_format_utils().convert_dataset(
            out_dir=None if target == source_dir else target, out_file_format=ARRAY_RECORD,
            dataset_version_dir=[source_dir], num_workers=1, fail_on_error=False)
    finally:
        absl_logger.removeFilter(wrong)
    if not _holds_array_record(target):
        raise RuntimeError(f"Converting {source_dir} to ArrayRecord into {target} left it "
                           f"incomplete (TFDS's errors above); run again to convert the rest")
    log.info("Converted %r in %.0f s", name, time.perf_counter() - start)


def _not_writable(directory: epath.Path) -> str | None:
    """None if a file can be created in `directory` (made if missing), else why not. A real
    write, not os.access: it answers for buckets too, and for root on a read-only mount."""
    probe = directory / f".ddpm_jax_write_test_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # OSError on local disk; tf.errors or gcsfs's errors for a bucket
        return f"{type(e).__name__}: {e}"
    return None


def _convert_format_utils():
    """TFDS's conversion module (`tfds convert_format`). It subclasses an Apache Beam class
    at import, although only its Beam mode (unused here) runs Beam: without apache-beam
    installed, an empty stand-in takes its place for that import, and only for it."""
    import importlib.util
    import sys
    import types
    stand_in = importlib.util.find_spec("apache_beam") is None
    if stand_in:
        sys.modules["apache_beam"] = types.SimpleNamespace(DoFn=object)
    try:
        from tensorflow_datasets.scripts.cli import convert_format_utils
    finally:
        if stand_in:
            del sys.modules["apache_beam"]
    return convert_format_utils


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether `url`'s server accepts a connection; offline, TFDS would retry for minutes."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _machine_lock(key: str):
    """An exclusive lock shared by all processes of this machine, named by `key`."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ddpm_jax_prepare_{digest}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) then CenterCrop(size) on a PIL image.

    The shorter side becomes `size` (the longer one truncated, keeping the
    aspect ratio), bilinear with PIL's antialiasing, then the central
    size x size square is cut out.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_image_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A decoded image as uint8 [size, size, channels]: converted to 'L' (channels=1) or 'RGB'
    (3), then resized and center-cropped (an image of that size already is left as it is)."""
    image = resize_and_center_crop(image.convert(_PIL_MODES[channels]), size)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def image_paths(folder: str | os.PathLike) -> list[epath.Path]:
    """The image files under `folder` (local or a URL), recursively, sorted by their path's
    parts (pathlib's order): the order of `load_folder`."""
    files = storage.files_under(folder)
    return [files[name] for name in sorted(files, key=lambda name: name.split("/"))
            if files[name].suffix.lower() in IMAGE_EXTENSIONS]


def folder_classes(folder: str | os.PathLike) -> list[str]:
    """The class names of an image folder, torchvision ImageFolder's rule: its subfolders'
    names, sorted; class k is the k-th. Images directly in `folder` belong to none."""
    return sorted(entry.name for entry in epath.Path(folder).iterdir() if entry.is_dir())


def folder_labels(folder: str | os.PathLike, paths: list[epath.Path]) -> np.ndarray:
    """int32 class labels of image `paths` under `folder` (see `folder_classes`); raises
    ValueError naming an image that lies in no class subfolder."""
    root = epath.Path(folder)
    index = {name: k for k, name in enumerate(folder_classes(root))}
    labels = []
    for path in paths:
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in index:
            raise ValueError(f"{path} lies in no class subfolder of {root}: a conditional "
                             f"model takes labels from the subfolders (one per class)")
        labels.append(index[parts[0]])
    return np.asarray(labels, np.int32)


def load_folder(folder: str | os.PathLike, image_size: int, channels: int
                ) -> tuple[np.ndarray, list[epath.Path]]:
    """All images under `folder` (recursively, sorted by path) as uint8 [N, S, S, C].

    Each image is converted to 'L' (channels=1) or 'RGB' (channels=3), then
    resized and center-cropped to image_size. Files whose extension is not in
    IMAGE_EXTENSIONS are ignored; image files that cannot be decoded are
    skipped, logged with their count and an example, and returned as the
    second value.
    """
    if channels not in _PIL_MODES:
        raise ValueError(f"channels={channels} is not supported for a folder; choose 1 or 3")
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be positive")
    root = epath.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (config.data.folder) is not a directory")
    paths = image_paths(root)
    images, skipped = [], []
    for path in paths:
        try:
            with path.open("rb") as f, Image.open(f) as image:
                images.append(to_image_array(image, image_size, channels))
        except Exception:  # decoders raise OSError, SyntaxError, zlib.error, ...: all mean unreadable
            skipped.append(path)
    if skipped:
        log.warning("Skipped %d unreadable image file(s) of %d in %s, e.g. %s",
                    len(skipped), len(paths), root, skipped[0])
    if not images:
        raise FileNotFoundError(
            f"no readable image in {root} (config.data.folder): {len(paths)} file(s) with "
            f"extensions {IMAGE_EXTENSIONS}, {len(skipped)} of them unreadable")
    return np.stack(images), skipped


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared TFDS split read by random access: each read decodes its records' images
    with PIL and passes them through `to_image_array`.

    It holds only names and numbers, so it pickles into Grain's worker processes,
    which open the ArrayRecord files themselves (`_records`, once per process).
    Made by `tfds_source`, which checks the image feature and the split.
    """
    dataset_dir: str  # the builder's versioned directory, local or gs://
    split: str  # a TFDS split string, e.g. 'train' or 'train[:90%]'
    image_key: str
    label_key: str | None  # the ClassLabel feature 'label' where the dataset has one
    image_size: int
    channels: int
    num_examples: int

    def __len__(self) -> int:
        return self.num_examples

    @property
    def decoded_bytes(self) -> int:
        return self.num_examples * self.image_size ** 2 * self.channels

    def read(self, indices) -> np.ndarray:
        return self._images(self._read_records(indices))

    def read_labeled(self, indices) -> tuple[np.ndarray, np.ndarray]:
        if self.label_key is None:
            raise ValueError(f"split {self.split!r} of {self.dataset_dir} has no 'label' "
                             f"ClassLabel feature")
        records = self._read_records(indices)
        return self._images(records), np.asarray([r[self.label_key] for r in records], np.int32)

    def _read_records(self, indices) -> list:
        return _records(self.dataset_dir, self.split, self.image_key).__getitems__(
            [int(i) for i in indices])

    def _images(self, records) -> np.ndarray:
        images = np.empty((len(records), self.image_size, self.image_size, self.channels),
                          np.uint8)
        for i, record in enumerate(records):
            with Image.open(io.BytesIO(record[self.image_key])) as image:
                images[i] = to_image_array(image, self.image_size, self.channels)
        return images


@functools.lru_cache(maxsize=8)
def _records(dataset_dir: str, split: str, image_key: str):
    """The split's ArrayRecord data source, images left encoded; opened once per process."""
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(dataset_dir).as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}, file_format=ARRAY_RECORD)


def tfds_source(builder: tfds.core.DatasetBuilder, split: str, *, image_key: str,
                image_size: int, channels: int, split_field: str = "split") -> TfdsSource:
    """`split` of a prepared builder as a TfdsSource; DatasetError (naming config.data.image_key
    or `split_field`, and listing what exists) if the feature or split does not exist."""
    import tensorflow_datasets as tfds
    features = builder.info.features
    if not (image_key in features and isinstance(features[image_key], tfds.features.Image)):
        listing = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
        images = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
        raise DatasetError(
            f"config.data.image_key={image_key!r}: dataset {builder.name!r} has no image "
            f"feature of that name; its image features: {images or 'none'} (all features: "
            f"{listing})")
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise DatasetError(
            f"{split_field}={split!r} is not a split of {builder.name!r}; choose one of "
            f"{sorted(builder.info.splits)}, or a TFDS slice of one such as 'train[:90%]' "
            f"({e})") from None
    labeled = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
    return TfdsSource(str(builder.data_dir), split, image_key, "label" if labeled else None,
                      image_size, channels, num_examples)
