"""A TFDS dataset built here for the streaming tests: non-square 40x48 RGB images with labels.

Each image is a smooth color gradient (so resizing has something to average)
with a bright square whose place and color depend on the index, and mild
noise; label = index % 10; record i of a split is image i. `prepare` writes it in
ArrayRecord format (or another: TFDS's default is tfrecord) into a data directory,
from which any process opens it by name (read-only: the class is registered only
where this module is imported).
"""
import numpy as np
import tensorflow_datasets as tfds

NAME = "ddpm_test_images"
HEIGHT, WIDTH = 40, 48
SPLITS = {"train": 2000, "test": 200}


def image(index: int) -> np.ndarray:
    """The uint8 [HEIGHT, WIDTH, 3] image number `index` (the test split continues the count)."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) * 255 / (WIDTH + HEIGHT)], -1)
    top, left = rng.integers(0, HEIGHT - 10), rng.integers(0, WIDTH - 10)
    base[top:top + 10, left:left + 10] = rng.integers(0, 256, 3)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


class DdpmTestImages(tfds.core.GeneratorBasedBuilder):
    """Registered by TFDS as NAME."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(HEIGHT, WIDTH, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }), disable_shuffling=True)  # record i is image(i), as in a sorted folder

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        offset = 0 if split == "train" else SPLITS["train"]
        for i in range(offset, offset + SPLITS[split]):
            yield i, {"image": image(i), "label": i % 10}


def prepare(data_dir, file_format="array_record") -> tfds.core.DatasetBuilder:
    builder = DdpmTestImages(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return builder
