"""How fast the input pipeline delivers training batches: input must never starve the device.

Streaming (default): builds a TFDS dataset of RGB PNGs at 32x32 and 64x64
(`ddpm_bench_images/32`, `/64`, prepared once into --data-dir) and times
`streaming.StreamIterator`, the reader of splits above
config.data.in_memory_max_bytes (records read by random access, decoded,
flipped; batches of --batch), with 0, 1 and 2 Grain worker processes. The
first batch (worker start) is left out of the rate.

--dataset fashion_mnist|mnist|cifar10: the in-memory path instead (the split
decoded once, `TrainIterator` gathering batches).

Compare either with the training images/s in BENCHMARKS.md.

    .venv/bin/python -m bench.input_rate [--sizes 32,64] [--workers 0,1,2] [--batch 128]
    .venv/bin/python -m bench.input_rate --dataset fashion_mnist
"""
import argparse
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from ddpm_jax.data import datasets, input_pipeline, streaming

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DdpmBenchImages(tfds.core.GeneratorBasedBuilder):
    """Photo-like RGB images (smooth gradients, a block, noise) at each config's size."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(size)) for size in (32, 64)]
    NUM_IMAGES = 4096

    def _info(self):
        size = int(self.builder_config.name)
        # Not dataset_info_from_configs: it reads metadata files next to the module (a script).
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        size = int(self.builder_config.name)
        y, x = np.mgrid[0:size, 0:size]
        for i in range(self.NUM_IMAGES):
            rng = np.random.default_rng(i)
            image = rng.uniform(0, 255, 3) * x[..., None] / size + rng.normal(0, 12, (size, size, 3))
            top, left = rng.integers(0, size // 2, 2)
            image[top:top + size // 3, left:left + size // 3] += rng.uniform(-80, 80, 3)
            yield i, {"image": np.clip(image + 60 * (y[..., None] / size), 0, 255).astype(np.uint8),
                      "label": i % 10}


def rate(batches, num_batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next `num_batches`)."""
    start = time.perf_counter()
    with batches:
        next(batches)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        seconds = time.perf_counter() - start
    return first, num_batches * batch_size / seconds


def streaming_rates(args) -> None:
    print(f"| image size | workers | images/s | ms per batch of {args.batch} | first batch, s |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        name = f"ddpm_bench_images/{size}"
        DdpmBenchImages(config=str(size), data_dir=args.data_dir,
                        file_format="array_record").download_and_prepare()
        source = input_pipeline.open_source(name, image_size=size, channels=3,
                                            data_dir=args.data_dir, in_memory_max_bytes=0)
        for workers in args.workers:
            first, images_per_s = rate(
                streaming.StreamIterator(source, args.batch, seed=0, random_flip=True,
                                         worker_count=workers), args.batches, args.batch)
            print(f"| {size}x{size}x3 | {workers} | {images_per_s:,.0f} | "
                  f"{args.batch / images_per_s * 1e3:.1f} | {first:.1f} |", flush=True)


def in_memory_rate(args) -> None:
    builder = datasets.prepare_tfds(args.dataset, data_dir=args.data_dir,
                                    manual_dir=args.manual_dir, allow_download=False)
    size, _, channels = builder.info.features["image"].shape
    start = time.perf_counter()
    source = input_pipeline.open_source(args.dataset, "train", image_size=size, channels=channels,
                                        data_dir=args.data_dir, allow_download=False)
    open_s = time.perf_counter() - start
    _, images_per_s = rate(input_pipeline.TrainIterator(source, args.batch, seed=0,
                                                        random_flip=True), args.batches, args.batch)
    print(f"{args.dataset}: split of {len(source):,} images decoded in {open_s:.1f} s; "
          f"TrainIterator {images_per_s:,.0f} images/s "
          f"({args.batch / images_per_s * 1e3:.2f} ms per batch of {args.batch}, random flips)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=datasets.TFDS_DATASETS,
                        help="time the in-memory path on this dataset instead")
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--data-dir", default=os.path.join(REPO, ".cache", "tfds"))
    parser.add_argument("--manual-dir", default=os.path.join(os.path.dirname(REPO), "shared",
                                                             "data", "fashion_mnist"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    in_memory_rate(args) if args.dataset else streaming_rates(args)


if __name__ == "__main__":
    main()
