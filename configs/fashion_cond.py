"""The design's Fashion-MNIST run, class-conditional with classifier-free guidance.

Everything as configs/fashion.py, plus a class embedding (10 classes and a
"no class" row) and 10% of the labels dropped to "no class" in training, so
that `sample.py --class_label=3 --guidance=2` can ask for a class
(docs/conditional.md).

    python train.py --config=configs/fashion_cond.py --workdir=runs/fashion_cond
"""
import ml_collections

from configs import fashion


def get_config() -> ml_collections.ConfigDict:
    config = fashion.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance = 2.0
    return config
