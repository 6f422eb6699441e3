"""Fakes 8 CPU devices before anything imports jax, and makes jax strict."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update('jax_numpy_rank_promotion', 'raise')
