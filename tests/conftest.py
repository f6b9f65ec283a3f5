"""Test set-up: eight fake CPU devices, configured before JAX starts its backend."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
