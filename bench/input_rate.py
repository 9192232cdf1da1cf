"""How fast the input pipeline delivers training batches (issue 7: input never starves the device).

Opens the config's TFDS split (decoding it into memory) and times `TrainIterator`,
the loop's reader, over --batches batches; compare its images/s with the training
images/s of BENCHMARKS.md (6,170 on one H100 for Fashion-MNIST).

    .venv/bin/python bench/input_rate.py [--dataset fashion_mnist] [--batch 128]
        [--data-dir .cache/tfds] [--manual-dir ../shared/data/fashion_mnist]
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ddpm_jax import datasets, input_pipeline  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=datasets.TFDS_DATASETS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--data-dir", default=os.path.join(REPO, ".cache", "tfds"))
    parser.add_argument("--manual-dir", default=os.path.join(os.path.dirname(REPO), "shared",
                                                             "data", "fashion_mnist"))
    args = parser.parse_args()
    builder = datasets.prepare_tfds(args.dataset, data_dir=args.data_dir,
                                    manual_dir=args.manual_dir, allow_download=False)
    size, _, channels = builder.info.features["image"].shape
    start = time.perf_counter()
    source = input_pipeline.open_source(args.dataset, "train", image_size=size, channels=channels,
                                        data_dir=args.data_dir, allow_download=False)
    open_s = time.perf_counter() - start
    with input_pipeline.TrainIterator(source, args.batch, seed=0, random_flip=True) as batches:
        next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
    print(f"{args.dataset}: split of {len(source):,} images decoded in {open_s:.1f} s; "
          f"TrainIterator {args.batches * args.batch / seconds:,.0f} images/s "
          f"({seconds / args.batches * 1e3:.2f} ms per batch of {args.batch}, random flips)")


if __name__ == "__main__":
    main()
