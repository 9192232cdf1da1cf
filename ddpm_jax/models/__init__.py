"""The networks: the design's UNet, its checks, embeddings and convolutions, PyTorch weights."""
