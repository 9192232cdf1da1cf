"""The design's Fashion-MNIST run on MNIST digits (same shape, network and schedule)."""
import ml_collections

from configs import fashion


def get_config() -> ml_collections.ConfigDict:
    config = fashion.get_config()
    config.data.dataset = "mnist"
    # Digits are not mirror-symmetric: a flipped 2 is not a 2.
    config.data.random_flip = False
    return config
