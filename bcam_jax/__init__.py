"""bcam-jax: explanation-guided image classification in JAX/Flax."""
