"""Datasets and the input pipeline: batches as a pure function of (seed, step)."""
