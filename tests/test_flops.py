"""flops.per_token against the FLOPs XLA counts in the compiled training step."""

import jax
import jax.numpy as jnp
import pytest

from mtnt_tpu import flops
from mtnt_tpu import lora
from mtnt_tpu import model as model_lib
from mtnt_tpu import steps

pytestmark = pytest.mark.slow  # three compiles of 1024-token training steps

_VOCAB, _L = 800, 1024  # long rows: attention is about half the FLOPs, so both terms count


def _batch() -> dict:
  ones = jnp.ones((1, _L), jnp.int32)
  return {'inputs': 5 * ones, 'targets': 7 * ones, 'mask': ones,
          'positions': jnp.arange(_L, dtype=jnp.int32)[None], 'segment_ids': ones}


def _compiled_flops(loss, params) -> float:
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


@pytest.mark.parametrize('variant', ['tiny', 'tiny_gemma3'])
def test_per_token_matches_the_compiled_step(variant):
  cfg = model_lib.build_config(variant, _VOCAB)
  model = model_lib.make_model(cfg)
  params = model_lib.init_params(model, jax.random.key(0))
  n = sum(p.size for p in jax.tree.leaves(params))
  loss = lambda p: steps.token_sums(model, p, _batch(), jnp.float32)['loss_sum']
  per_token = flops.per_token(n, cfg.num_layers, cfg.num_heads, cfg.head_dim, _L)
  # Beside the matmuls XLA also counts softmax, norms and masks: a few percent.
  assert 1.0 <= _compiled_flops(loss, params) / (_L * per_token) < 1.1


def test_lora_per_token_counts_no_frozen_weight_gradients():
  cfg = model_lib.build_config('tiny', _VOCAB)
  spec = lora.LoraSpec(rank=2, alpha=2.0, targets='both')
  model = lora.LoraModel(model_lib.make_model(cfg), spec)
  base, adapters = lora.split(model_lib.init_params(model, jax.random.key(0)))
  n = sum(p.size for p in jax.tree.leaves(base))
  loss = lambda a: steps.token_sums(model, lora.merge(base, a), _batch(), jnp.float32)['loss_sum']
  per_token = flops.per_token(n, cfg.num_layers, cfg.num_heads, cfg.head_dim, _L,
                              weight_grads=False)
  assert 1.0 <= _compiled_flops(loss, adapters) / (_L * per_token) < 1.1
