"""simclr_jax: SimCLR (Chen et al. 2020) in JAX/Flax, from a laptop CPU to Cloud TPU pods."""
