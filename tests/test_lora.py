"""LoRA adapters on Gemma's einsums: placement, zero start, folding."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import lora
from mtnt_tpu import model as model_lib


def _init(variant, spec):
  cfg = model_lib.build_config(variant, 800)
  base = model_lib.make_model(cfg)
  x = jnp.zeros((1, 4), jnp.int32)
  params = lora.LoraModel(base, spec).init(jax.random.key(0), x, x, None,
                                           jnp.ones((1, 4, 4), bool))['params']
  return cfg, base, params


def _paths(tree):
  return set(flax.traverse_util.flatten_dict(tree, sep='/'))


@pytest.mark.parametrize('targets,expected', [
    ('attention', {'attn/q_einsum/lora', 'attn/kv_einsum/lora', 'attn/attn_vec_einsum/lora'}),
    ('ffw', {'mlp/lora_gating_einsum', 'mlp/lora_linear'}),
])
def test_adapters_sit_beside_their_targets_only(targets, expected):
  _, _, params = _init('tiny', lora.LoraSpec(4, 8.0, targets))
  base, adapters = lora.split(params)
  found = {p.split('/', 1)[1].rsplit('/', 1)[0] for p in _paths(adapters) if p.startswith('layer_0/')}
  assert found == expected
  plain = model_lib.abstract_params(model_lib.make_model(model_lib.build_config('tiny', 800)))
  assert _paths(base) == _paths(plain), 'the base tree is the plain Gemma tree'


@pytest.mark.slow
def test_training_starts_from_the_base_model_exactly():
  cfg, base_model, params = _init('tiny', lora.LoraSpec(4, 8.0, 'both'))
  base, _ = lora.split(params)
  toks = jnp.array([[2, 5, 6, 7, 8, 9]])
  pos, mask = jnp.arange(6)[None], model_lib.attention_mask(jnp.ones((1, 6), jnp.int32))
  with_adapters = lora.LoraModel(base_model, lora.LoraSpec(4, 8.0, 'both')).apply(
      {'params': params}, toks, pos, None, mask)[0]
  plain = base_model.apply({'params': base}, toks, pos, None, mask)[0]
  np.testing.assert_array_equal(with_adapters, plain)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['tiny', 'tiny_gemma3'])
def test_folded_weights_equal_the_adapted_model(variant):
  spec = lora.LoraSpec(4, 8.0, 'both')
  cfg, base_model, params = _init(variant, spec)
  base, adapters = lora.split(params)
  adapters = jax.tree.map(lambda a: 0.1 * jax.random.normal(jax.random.key(1), a.shape), adapters)
  toks = jnp.array([[2, 5, 6, 7, 8, 9]])
  pos, mask = jnp.arange(6)[None], model_lib.attention_mask(jnp.ones((1, 6), jnp.int32))
  adapted = lora.LoraModel(base_model, spec).apply(
      {'params': lora.merge(base, adapters)}, toks, pos, None, mask)[0]
  folded = base_model.apply({'params': lora.fold(base, adapters, spec,
                                                 cfg.transpose_gating_einsum)},
                            toks, pos, None, mask)[0]
  plain = base_model.apply({'params': base}, toks, pos, None, mask)[0]
  assert np.abs(adapted - plain).max() > 1e-2  # the adapters do something
  np.testing.assert_allclose(adapted, folded, atol=2e-5)


def test_bad_lora_config_names_the_choices():
  class Cfg:
    rank, alpha, targets = 4, 8.0, 'mlp'
  with pytest.raises(ValueError, match="config.lora.targets='mlp'"):
    lora.LoraSpec.from_config(Cfg)
