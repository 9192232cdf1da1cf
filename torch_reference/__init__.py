"""The PyTorch reference: the design document's code, which ddpm_jax is checked against.

`unet` (the design's network), `diffusion` (its schedules, losses and sampler) and
`inception` (pytorch-fid's FID Inception-v3). The tests compare ddpm_jax against these
number for number, and the benchmarks run them side by side with it. They import
torch, which only the `test` extra installs: `pip install -e '.[test]'`.
"""
