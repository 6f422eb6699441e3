"""Model FLOPs per token and per-chip peak FLOP/s, for MFU.

MFU = (non-pad tokens/s) x (model FLOPs per token) / (devices x peak FLOP/s).
Model FLOPs per token follow the PaLM appendix: 6 x parameters (a multiply-add
is 2 FLOPs, forward once and backward twice) plus attention's
12 x layers x heads x head_dim x row length. Padding is never counted as
work done, so packing raises MFU honestly and padding lowers it.
"""

from __future__ import annotations

import dataclasses
import time

from absl import logging
import jax
import jax.numpy as jnp

# Dense bf16 peak per JAX device (a v4 or v5p chip is one device: megacore).
PEAK_TFLOPS = {
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v5': 459.0,
    'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
    'NVIDIA H100': 989.0,
    'NVIDIA H200': 989.0,
}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What MFU is computed from."""
  per_token: float  # model FLOPs per trained (non-pad) token
  peak: float  # FLOP/s of all devices together; 0 when unknown (no MFU logged)


def training_budget(model_config, abstract_params, row_len: int, lora: bool,
                    peak_tflops: float = 0.0, frozen_params: int = 0) -> Budget:
  """The run's FLOPs per token and its devices' peak, logged once at start-up.

  `frozen_params` (config.train.freeze) get no weight gradient: 4 FLOPs per
  parameter and token, like LoRA's base."""
  m = model_config
  n_params = sum(p.size for p in jax.tree.leaves(abstract_params))
  peak, source = peak_per_device(jax.devices()[0], peak_tflops)
  flops = per_token(n_params, m.num_layers, m.num_heads, m.head_dim, row_len,
                    weight_grads=not lora, frozen_params=frozen_params)
  logging.info('model FLOPs per token %.3g (%d x %d params, %d of them frozen, + attention); '
               'peak %.3g FLOP/s per device (%s)', flops, 4 if lora else 6, n_params,
               n_params if lora else frozen_params, peak, source)
  return Budget(per_token=flops, peak=peak * jax.device_count())


def per_token(num_params: int, num_layers: int, num_heads: int, head_dim: int,
              row_len: int, weight_grads: bool = True, frozen_params: int = 0) -> float:
  """Training FLOPs per token. LoRA (weight_grads=False) skips the frozen
  weights' gradients: 4 x parameters instead of 6 (adapters are negligible);
  so do `frozen_params` of a full fine-tune (config.train.freeze)."""
  per_param = 6.0 if weight_grads else 4.0
  return (per_param * (num_params - frozen_params) + 4.0 * frozen_params
          + 12.0 * num_layers * num_heads * head_dim * row_len)


def peak_per_device(device: jax.Device, configured_tflops: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the figure came from) for one device."""
  if configured_tflops:
    return configured_tflops * 1e12, 'config.runtime.peak_tflops'
  kind = device.device_kind
  for prefix, tflops in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return tflops * 1e12, f'{kind} datasheet bf16'
  if device.platform == 'cpu':
    return _measured_cpu_peak(), 'measured f32 matmul, shared by the faked devices'
  return 0.0, f'unknown device kind {kind!r}: set config.runtime.peak_tflops'


def _measured_cpu_peak() -> float:
  # Faked CPU devices share the host's cores, so one device's peak is what
  # the whole CPU does on a dense matmul, divided among them. The fastest of
  # several: a slow sample is the machine busy elsewhere, and a peak measured
  # low would log an MFU above 1.
  n = 1024
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a, device=jax.local_devices()[0])
  f(x).block_until_ready()
  fastest = float('inf')
  for _ in range(8):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    fastest = min(fastest, time.perf_counter() - t0)
  return 2.0 * n**3 / fastest / jax.local_device_count()
