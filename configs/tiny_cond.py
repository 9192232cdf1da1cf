"""configs/tiny.py, class-conditional (10 Fashion-MNIST classes): the tests' conditional model."""
import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.model.num_classes = 10
    return config
