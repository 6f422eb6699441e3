"""The loss and the train step: every example counts, every mesh agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import state as state_lib
from mtnt_tpu import steps
from mtnt_tpu import train
from mtnt_tpu.data import pipeline
from tests import helpers


@pytest.fixture(scope='module')
def run():
  return train.build(helpers.tiny_config(**{'train.batch_size': 8}))


@pytest.fixture(scope='module')
def batch():
  cfg = helpers.tiny_config()
  b = helpers.train_batches(cfg, 1, local_batch=8)[0]
  return {k: b[k] for k in pipeline.MODEL_KEYS}


@pytest.fixture(scope='module')
def params(run):
  return state_lib.init_state(run, jax.random.key(0)).params


def _loss(run, params, batch):
  sums = steps.token_sums(run.model, params, batch, jnp.float32)
  return sums['loss_sum'] / sums['target_tokens']


@pytest.mark.slow
def test_loss_depends_on_every_example(run, params, batch):
  """Changing any row moves the loss: no row (e.g. logits[0] alone) stands for the batch."""
  base = float(_loss(run, params, batch))
  for row in range(batch['targets'].shape[0]):
    changed = dict(batch)
    t = batch['targets'].copy()
    where = np.nonzero(batch['mask'][row])[0]
    t[row, where] = (t[row, where] + 7) % 800
    changed['targets'] = t
    assert float(_loss(run, params, changed)) != pytest.approx(base, rel=1e-6), row


def test_gradient_reaches_every_example(run, params, batch):
  def per_row_loss(p, row_weights):
    b = dict(batch, mask=batch['mask'] * row_weights[:, None])
    return steps.token_sums(run.model, p, b, jnp.float32)['loss_sum']
  g = jax.grad(per_row_loss, argnums=1)(params, jnp.ones(batch['mask'].shape[0]))
  assert np.all(np.asarray(g) > 0)


def test_loss_ignores_prompt_and_padding(run, params, batch):
  changed = dict(batch)
  t = batch['targets'].copy()
  t[batch['mask'] == 0] = 5
  changed['targets'] = t
  assert float(_loss(run, params, changed)) == pytest.approx(float(_loss(run, params, batch)))


def _one_step(config, batch, devices):
  mesh_kw = {'mesh.data': 1, 'mesh.fsdp': -1}
  run = train.build(helpers.tiny_config(**config, **mesh_kw, **{'train.batch_size': 8}),
                    devices)
  state = state_lib.init_state(run, jax.random.key(0))
  train_step = train.compile_steps(run).train
  state, m = train_step(state, pipeline.to_global(batch, run.batch_sharding), {})
  return helpers.host(state.params), helpers.host(m)


@pytest.mark.slow
def test_eight_devices_match_one(batch):
  p8, m8 = _one_step({}, batch, jax.devices())
  p1, m1 = _one_step({}, batch, jax.devices()[:1])
  assert m8['loss'] == pytest.approx(m1['loss'], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), p8, p1)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(batch):
  p1, m1 = _one_step({}, batch, jax.devices()[:4])
  p2, m2 = _one_step({'optim.grad_accum_steps': 2}, batch, jax.devices()[:4])
  assert m2['loss'] == pytest.approx(m1['loss'], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), p1, p2)


@pytest.mark.slow
def test_packed_loss_equals_unpacked_loss(run, params):
  """Attention never crosses examples: packing changes nothing but speed."""
  cfg = helpers.tiny_config(**{'data.packing': True})
  packed = helpers.train_batches(cfg, 1, local_batch=4)[0]
  ids = sorted(set(packed['index'][packed['index'] >= 0].tolist()))
  src = pipeline.source(cfg.data.dir, cfg.data.train_split)
  rows = [pipeline._pad_row(vars(pipeline.tokenize_example(run.tokenizer, i, src[i], 'French',
                                                            cfg.data.max_len)), cfg.data.max_len)
          for i in ids]
  padded = {k: np.stack([r[k] for r in rows]) for k in pipeline.MODEL_KEYS}
  assert len(ids) > 4  # more examples than rows: something was packed
  a = steps.token_sums(run.model, params, {k: packed[k] for k in pipeline.MODEL_KEYS}, jnp.float32)
  b = steps.token_sums(run.model, params, padded, jnp.float32)
  assert float(a['target_tokens']) == float(b['target_tokens'])
  np.testing.assert_allclose(float(a['loss_sum']), float(b['loss_sum']), rtol=1e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(batch):
  run = train.build(helpers.tiny_config(**{'model.compute_dtype': 'bfloat16',
                                           'train.batch_size': 8}))
  state = state_lib.init_state(run, jax.random.key(0))
  train_step = train.compile_steps(run).train
  g = {k: pipeline.to_global(batch, run.batch_sharding)[k] for k in pipeline.MODEL_KEYS}
  state, m = train_step(state, g, {})
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert np.isfinite(float(m['loss']))
