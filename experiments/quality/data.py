"""The data and classifier of experiments/quality/run.py, portable to a machine without TFDS or Orbax's
format of this one (the lent GPU: no tensorflow_datasets, another Orbax and JAX).

Run once here, through the project's own TFDS pipeline:

    TFDS_DATA_DIR=.cache/tfds DDPM_JAX_MANUAL_DIR=../shared/data/fashion_mnist \
    python -m experiments.quality.data --classifier_dir=CLS --out_dir=.gpu

writes `.gpu/fashion_mnist.npz` (train and test images as uint8, in the TFDS splits' order,
with their labels: `run.py --data_npz` trains on exactly the batches a TFDS run sees) and
`.gpu/classifier.msgpack` (the classifier's parameters and record in Flax's msgpack, which
any Flax reads; `run.py --classifier_dir` takes it and writes it back as an Orbax
classifier with that machine's Orbax).
"""
import argparse
import json
import os
import shutil

import numpy as np
from flax import serialization

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import classifier, suite
from ddpm_jax.training import loop

SPLITS = ("train", "test")


class ConfigData:
    """The config's own dataset (TFDS or a folder), as the rest of the project reads it."""

    def __init__(self, config):
        self.config = config

    def train_source(self) -> input_pipeline.Source:
        return loop.open_train_source(self.config)

    def images(self, split: str, num_images=None) -> np.ndarray:
        return suite.load_split_images(self.config, split, num_images)


class NpzData:
    """The splits of an .npz written by `export` (keys `{split}_images`, `{split}_labels`)."""

    def __init__(self, path: str, image_shape):
        with np.load(path) as data:
            missing = {f"{s}_images" for s in SPLITS} - set(data.files)
            if missing:
                raise ValueError(f"--data_npz={path} lacks {sorted(missing)}; it has "
                                 f"{sorted(data.files)} (write it with experiments/quality/data.py)")
            self.arrays = {s: data[f"{s}_images"] for s in SPLITS}
        for split, images in self.arrays.items():
            if images.dtype != np.uint8 or images.shape[1:] != tuple(image_shape):
                raise ValueError(f"--data_npz={path}: {split}_images are {images.dtype} "
                                 f"{images.shape}, the config wants uint8 [N, "
                                 f"{', '.join(map(str, image_shape))}]")

    def train_source(self) -> input_pipeline.Source:
        return input_pipeline.ArraySource(self.arrays["train"])

    def images(self, split: str, num_images=None) -> np.ndarray:
        if split not in self.arrays:
            raise ValueError(f"split {split!r}: the .npz holds {list(self.arrays)}")
        return input_pipeline.to_float(self.arrays[split][:num_images])


def open_data(config, data_npz: str = ""):
    """--data_npz's splits when given, else the config's own dataset."""
    if not data_npz:
        return ConfigData(config)
    return NpzData(data_npz, (config.data.image_size,) * 2 + (config.data.channels,))


def classifier_dir(path: str, scratch_dir: str) -> str:
    """An Orbax classifier directory: `path` itself, or a .msgpack of `export` rewritten with
    this machine's Orbax under `scratch_dir`."""
    if not path.endswith(".msgpack"):
        return path
    with open(path, "rb") as f:
        stored = serialization.msgpack_restore(f.read())
    record = json.loads(stored["record"])
    arch = record.pop("architecture")
    model = classifier.Classifier(num_classes=arch["num_classes"],
                                  features=tuple(arch["features"]), hidden=arch["hidden"])
    directory = os.path.join(scratch_dir, "classifier")
    if os.path.exists(directory):  # written by an earlier run into the same scratch_dir
        shutil.rmtree(directory)
    classifier.save_classifier(directory, model, stored["params"], record)
    return directory


def export_data(path: str, dataset: str, image_size: int, channels: int) -> None:
    """Both splits' images and labels, read through the project's TFDS pipeline, as an .npz."""
    arrays = {}
    for split in SPLITS:
        source = input_pipeline.open_source(dataset, split, image_size=image_size,
                                            channels=channels)
        images, labels = source.read_labeled(np.arange(len(source)))
        arrays.update({f"{split}_images": images, f"{split}_labels": labels})
    np.savez_compressed(path, **arrays)


def export_classifier(classifier_path: str, path: str) -> None:
    """A classifier of train_classifier.py as one msgpack file (`classifier_dir` reads it)."""
    model, params, metadata = classifier.load_classifier(classifier_path)
    record = json.dumps({"architecture": classifier._architecture(model), **metadata})
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({"params": params, "record": record}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier_dir", required=True, help="from train_classifier.py")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    export_data(os.path.join(args.out_dir, f"{args.dataset}.npz"), args.dataset,
                args.image_size, args.channels)
    export_classifier(args.classifier_dir, os.path.join(args.out_dir, "classifier.msgpack"))
    for name in sorted(os.listdir(args.out_dir)):
        print(f"{os.path.join(args.out_dir, name)}: "
              f"{os.path.getsize(os.path.join(args.out_dir, name)) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
