"""Where the training images come from: TFDS datasets prepared offline, or a folder.

TFDS datasets are prepared once per data directory in ArrayRecord format, so
that reading them later needs neither TensorFlow nor tf.data (preparing does
need TensorFlow). TFDS's own builders take the official files from a manual
directory, verify their checksums and never download them; with no files and
no network this module fails at once with an error naming the files, instead
of TFDS retrying its downloads for minutes.

A folder of the user's own images is read into memory, each image resized and
center-cropped as the design document's torchvision transforms do.

tensorflow_datasets is imported only where a dataset is prepared or opened, so
that training on in-memory or synthetic data (benchmarks, accelerators without
TFDS installed) does not need it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

TFDS_DATASETS = ("fashion_mnist", "mnist", "cifar10")
MANUAL_DIR_ENV = "DDPM_JAX_MANUAL_DIR"
# torchvision ImageFolder's list: the formats PIL reads that hold photos.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_PIL_MODES = {1: "L", 3: "RGB"}

log = logging.getLogger(__name__)


class MissingDataError(FileNotFoundError):
    """The dataset is not prepared and its official files are neither on disk nor downloadable."""


def official_files(name: str) -> dict[str, str]:
    """File name -> download URL of each official file the TFDS builder `name` needs."""
    _check_tfds_name(name)
    import tensorflow_datasets as tfds
    return {info.filename: url for url, info in tfds.builder_cls(name).url_infos.items()}


def resolve_manual_dir(name: str, manual_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory that holds dataset `name`'s official files, or None if none is configured.

    `manual_dir` (else $DDPM_JAX_MANUAL_DIR) may hold the files itself or in a
    subdirectory named after the dataset; mnist and fashion_mnist share file
    names, so one directory can serve both only through such subdirectories.
    """
    root = manual_dir if manual_dir is not None else os.environ.get(MANUAL_DIR_ENV)
    if not root:
        return None
    root = Path(root).expanduser()
    return root / name if (root / name).is_dir() else root


def prepare_tfds(name: str, *, data_dir: str | os.PathLike | None = None,
                 manual_dir: str | os.PathLike | None = None,
                 allow_download: bool = True) -> tfds.core.DatasetBuilder:
    """The builder of TFDS dataset `name`, prepared in ArrayRecord format under `data_dir`.

    data_dir: TFDS data directory; None means $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    manual_dir: see `resolve_manual_dir`. Official files found there are used
      (checksums verified); missing ones are downloaded only if `allow_download`
      and their server answers, else `MissingDataError` says what to put where.
    Preparing happens once per data directory; processes on one machine wait
    for each other through a lock file instead of preparing twice.
    """
    import tensorflow_datasets as tfds
    _check_tfds_name(name)
    data_dir = None if data_dir is None else str(Path(data_dir).expanduser())
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with _machine_lock(f"{builder.data_dir}"):
        if not builder.is_prepared():
            _prepare(builder, resolve_manual_dir(name, manual_dir), allow_download)
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: Path | None, allow_download: bool) -> None:
    import tensorflow_datasets as tfds
    name = builder.name
    files = official_files(name)
    missing = [f for f in files if manual_dir is None or not (manual_dir / f).is_file()]
    if missing and not (allow_download and all(_reachable(files[f]) for f in missing)):
        raise MissingDataError(_missing_message(name, builder.data_dir, manual_dir, missing))
    from ddpm_jax import console
    log.info("Preparing TFDS dataset %r into %s (once; TFDS's progress bars with "
             "--verbosity=1)", name, builder.data_dir)
    tfds.display_progress_bar(console.verbose())  # its bars interleave, one per split and stage
    start = time.perf_counter()
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        log.info("Prepared %r in %.0f s", name, time.perf_counter() - start)
    except tfds.download.download_manager.NonMatchingChecksumError as e:
        raise MissingDataError(
            f"A file given for dataset {name!r} in {manual_dir} is not its official file "
            f"(mnist and fashion_mnist use the same file names: keep each in its own "
            f"subdirectory <manual_dir>/{name}/).\n{e}") from None
    except ImportError as e:
        raise ImportError(f"Preparing TFDS dataset {name!r} needs TensorFlow "
                          f"(pip install tensorflow-cpu); reading it afterwards does not. ({e})") from e


def _missing_message(name: str, data_dir: str, manual_dir: Path | None, missing: list[str]) -> str:
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


def _check_tfds_name(name: str) -> None:
    if name not in TFDS_DATASETS:
        raise ValueError(f"dataset {name!r} is not a TFDS dataset of this project; "
                         f"choose one of {TFDS_DATASETS}")


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


def load_folder(folder: str | os.PathLike, image_size: int, channels: int
                ) -> tuple[np.ndarray, list[Path]]:
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
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (config.data.folder) is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    images, skipped = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(_PIL_MODES[channels])
        except Exception:  # decoders raise OSError, SyntaxError, zlib.error, ...: all mean unreadable
            skipped.append(path)
            continue
        array = np.asarray(resize_and_center_crop(image, image_size), dtype=np.uint8)
        images.append(array.reshape(image_size, image_size, channels))
    if skipped:
        log.warning("Skipped %d unreadable image file(s) of %d in %s, e.g. %s",
                    len(skipped), len(paths), root, skipped[0])
    if not images:
        raise FileNotFoundError(
            f"no readable image in {root} (config.data.folder): {len(paths)} file(s) with "
            f"extensions {IMAGE_EXTENSIONS}, {len(skipped)} of them unreadable")
    return np.stack(images), skipped
