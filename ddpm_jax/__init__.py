"""ddpm-jax: DDPM in JAX/Flax, a port of the PyTorch design of "The Annotated Diffusion Model"."""
