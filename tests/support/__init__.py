"""What several test files share: the PyTorch references written from the design, a tiny
TFDS dataset, train helpers, fixtures."""
