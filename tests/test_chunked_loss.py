"""The chunked loss (config.model.loss_chunk): the plain loss's sums and gradients,
without ever holding the [tokens, vocab] logits."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import model as model_lib
from mtnt_tpu import steps
from mtnt_tpu import train
from mtnt_tpu import state as state_lib
from mtnt_tpu.data import pipeline
from tests import helpers

B, L = 4, 16


def _random_batch(vocab: int, B: int = B, L: int = L) -> dict:
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, L // 2:] = 2  # two packed examples a row, padding at the end of row 0
  seg[0, -3:] = 0
  pos = np.concatenate([np.arange(L // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
  mask = (rng.random((B, L)) < 0.6) & (seg > 0)
  return {'inputs': rng.integers(0, vocab, (B, L), dtype=np.int32), 'positions': pos,
          'segment_ids': seg, 'targets': rng.integers(0, vocab, (B, L), dtype=np.int32),
          'mask': mask.astype(np.int32)}


def _tiny(softcap=None, vocab=300):
  cfg = dataclasses.replace(model_lib.build_config('tiny', vocab), final_logit_softcap=softcap)
  model = model_lib.make_model(cfg)
  return model, model_lib.init_params(model, jax.random.key(1))


def _close(a, b):
  # fp32 sums in another order: within 1e-5 of the leaf's largest value.
  b = np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.slow
@pytest.mark.parametrize('softcap', [None, 5.0])
@pytest.mark.parametrize('loss_chunk', [B * L // 4, B, 1])  # 4 chunks, one per position, floor
def test_sums_and_gradients_equal_plain(softcap, loss_chunk):
  model, params = _tiny(softcap)
  batch = _random_batch(300)

  def f(p, chunk):
    s = steps.token_sums(model, p, batch, jnp.float32, chunk)
    return s['loss_sum'], s

  (_, plain), g_plain = jax.value_and_grad(f, has_aux=True)(params, 0)
  (_, chunked), g_chunked = jax.value_and_grad(f, has_aux=True)(params, loss_chunk)
  assert float(plain['target_tokens']) == float(chunked['target_tokens']) > 0
  np.testing.assert_allclose(chunked['loss_sum'], plain['loss_sum'], rtol=1e-6)
  assert float(chunked['correct']) == float(plain['correct'])
  jax.tree.map(_close, g_chunked, g_plain)


def test_frozen_table_gradients_equal_plain():
  """The embedding frozen (LoRA, config.train.freeze): its gradient is skipped, the rest equal."""
  model, params = _tiny(5.0)
  batch = _random_batch(300)
  rest = {k: v for k, v in params.items() if k != 'embedder'}

  def f(r, chunk):
    return steps.token_sums(model, {**r, 'embedder': params['embedder']}, batch, jnp.float32,
                            chunk)['loss_sum']

  jax.tree.map(_close, jax.grad(f)(rest, 16), jax.grad(f)(rest, 0))


@pytest.mark.slow
def test_softcap_is_applied():
  """With a tight soft-cap every logit is within it, so the loss moves."""
  model, params = _tiny(None)
  capped, _ = _tiny(0.5)
  batch = _random_batch(300)
  a = steps.token_sums(model, params, batch, jnp.float32, 16)['loss_sum']
  b = steps.token_sums(capped, params, batch, jnp.float32, 16)['loss_sum']
  assert abs(float(a) - float(b)) > 1e-3


def test_hidden_states_then_logits_is_forward():
  model, params = _tiny(3.0)
  b = _random_batch(300)
  args = (model, params, b['inputs'], b['positions'], b['segment_ids'])
  x_BLD = model_lib.hidden_states(*args)
  logits = model_lib.output_logits(model.config, params['embedder']['input_embedding'],
                                   x_BLD)
  np.testing.assert_allclose(logits, model_lib.forward(*args), rtol=1e-6, atol=1e-6)


def test_chunks_divide_the_row_length():
  assert steps.num_loss_chunks(4, 16, 64) == 1
  assert steps.num_loss_chunks(4, 16, 16) == 4
  assert steps.num_loss_chunks(4, 16, 12) == 8
  assert steps.num_loss_chunks(4, 16, 1) == 16


def _one_step(batch, loss_chunk):
  run = train.build(helpers.tiny_config(**{'train.batch_size': 8,
                                           'model.loss_chunk': loss_chunk}))
  state = state_lib.init_state(run, jax.random.key(0))
  compiled = train.compile_steps(run)
  train_step, eval_step = compiled.train, compiled.eval
  g = pipeline.to_global(batch, run.batch_sharding)
  sums = eval_step(state.params, g)
  state, m = train_step(state, g, {})
  return helpers.host(state.params), helpers.host(m), helpers.host(sums)


@pytest.mark.slow
def test_train_step_on_eight_devices_equals_plain():
  cfg = helpers.tiny_config()
  b = helpers.train_batches(cfg, 1, local_batch=8)[0]
  b = {k: b[k] for k in pipeline.MODEL_KEYS}
  p0, m0, s0 = _one_step(b, 0)
  p1, m1, s1 = _one_step(b, 8 * 64 // 8)  # 8 chunks over the 2 x 4 mesh
  assert m1['loss'] == pytest.approx(m0['loss'], rel=1e-6)
  assert m1['accuracy'] == m0['accuracy']
  np.testing.assert_allclose(s1['loss_sum'], s0['loss_sum'], rtol=1e-6)
  jax.tree.map(_close, p1, p0)


def test_bad_loss_chunk_is_refused():
  with pytest.raises(train.ConfigError, match='config.model.loss_chunk'):
    train.build(helpers.tiny_config(**{'model.loss_chunk': -1}))


_BYTES = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'pred': 1}


def _largest_buffer(loss_chunk: int, vocab: int, batch: int, length: int) -> int:
  """Bytes of the largest array in the compiled train step's HLO (one device's share)."""
  config = helpers.tiny_config(**{'train.batch_size': batch, 'data.max_len': length,
                                   'model.loss_chunk': loss_chunk})
  run = train.build_without_files(config, jax.devices(), vocab)
  hlo = train.lower_steps(run).train.compile().as_text()
  return max(_BYTES[t] * int(np.prod([int(d) for d in dims.split(',')]))
             for t, dims in re.findall(r'\b(f32|bf16|s32|u32|pred)\[([\d,]+)\]', hlo))


@pytest.mark.slow
def test_logits_are_never_whole_in_the_train_step():
  """A large vocabulary on the 2 x 4 mesh: the plain train step holds each
  device's [tokens, vocab] fp32 logits, the chunked one nothing near that."""
  vocab, batch, length = 16_384, 64, 64
  local_logits = batch * length // 8 * vocab * 4  # 4x the embedding table
  assert _largest_buffer(0, vocab, batch, length) >= local_logits  # the check can fail
  assert _largest_buffer(batch * length // 8, vocab, batch, length) <= local_logits / 4
