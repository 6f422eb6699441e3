"""config.model.remat: recomputing blocks changes memory, never the numbers or the tree."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import model as model_lib
from mtnt_tpu import steps
from mtnt_tpu import train
from mtnt_tpu.data import pipeline
from tests import helpers

_VOCAB = 800


@pytest.fixture(scope='module')
def batch():
  b = helpers.train_batches(helpers.tiny_config(), 1, local_batch=4)[0]
  return {k: b[k] for k in pipeline.MODEL_KEYS}


@pytest.fixture(scope='module')
def params():
  cfg = model_lib.build_config('tiny', _VOCAB)
  return model_lib.init_params(model_lib.make_model(cfg), jax.random.key(0))


def _loss_and_grads(remat: str, params, batch):
  model = model_lib.make_model(model_lib.build_config('tiny', _VOCAB), remat)

  def loss(p):
    sums = steps.token_sums(model, p, batch, jnp.float32)
    return sums['loss_sum'] / sums['target_tokens']
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['block', 'matmuls'])
def test_remat_keeps_loss_and_gradients(remat, params, batch):
  want_loss, want_g = _loss_and_grads('none', params, batch)
  loss, g = _loss_and_grads(remat, params, batch)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, want_g)


@pytest.mark.parametrize('variant', ['tiny', 'tiny_gemma3', 'gemma_2b'])
@pytest.mark.parametrize('remat', ['block', 'matmuls'])
def test_remat_keeps_the_parameter_tree(variant, remat):
  """Same paths, shapes and dtypes: Kaggle checkpoints load into any policy."""
  cfg = model_lib.build_config(variant, _VOCAB)

  def tree(r):
    flat = flax.traverse_util.flatten_dict(
        model_lib.abstract_params(model_lib.make_model(cfg, r)), sep='/')
    return {k: (v.shape, v.dtype) for k, v in flat.items()}
  want = tree('none')
  assert 'layer_0/attn/q_einsum/w' in want or 'layer_0/attn/qkv_einsum/w' in want
  assert tree(remat) == want


def test_remat_is_used_by_the_train_step():
  """The policy reaches the lowered step: 'block' recomputes every matmul of the
  forward pass in the backward pass, 'matmuls' only the batched (attention) ones."""
  def dots(remat):
    run = train.build(helpers.tiny_config(**{'model.remat': remat, 'train.batch_size': 8}))
    lowered = train.lower_steps(run).train
    return lowered.as_text().count('stablehlo.dot_general')
  assert dots('none') < dots('matmuls') < dots('block')


def test_unknown_remat_is_a_config_error():
  with pytest.raises(train.ConfigError, match=r"config.model.remat='all'.*'none', 'block', 'matmuls'"):
    train.build(helpers.tiny_config(**{'model.remat': 'all'}))
