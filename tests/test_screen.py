"""Greedy decoding's bf16 screen: always the fp32 argmax, proven or computed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import model as model_lib
from mtnt_tpu import sampling


def _case(seed: int, V: int = 1000, D: int = 128, B: int = 16):  # D: the tiny model's
  rng = np.random.default_rng(seed)
  table_VD = rng.normal(size=(V, D)).astype(np.float32) * 0.5
  x_BD = rng.normal(size=(B, D)).astype(np.float32) * 3
  return jnp.asarray(x_BD), jnp.asarray(table_VD)


def _screen(x_BD, table_VD, cfg):
  return jax.jit(lambda x, t: sampling.screened_argmax(
      x, t, t.astype(jnp.bfloat16), jnp.max(jnp.linalg.norm(t, axis=-1)), cfg))(x_BD, table_VD)


@pytest.mark.parametrize('softcap', [None, 5.0])
def test_screen_proves_the_fp32_argmax_of_clear_winners(softcap):
  cfg = dataclasses.replace(model_lib.build_config('tiny', 1000), final_logit_softcap=softcap)
  x_BD, table_VD = _case(0)
  token_B, fell_back = _screen(x_BD, table_VD, cfg)
  want_B = jnp.argmax(model_lib.output_logits(cfg, table_VD, x_BD), axis=-1)
  np.testing.assert_array_equal(token_B, want_B)
  assert not fell_back, 'random logits leave a clear winner in every row'


def test_screen_falls_back_to_fp32_logits_when_too_many_tokens_tie_in_bf16():
  cfg = model_lib.build_config('tiny', 1000)
  x_BD, table_VD = _case(1)
  # Row 3's winner gets more near-twins than the screen scores: equal in bf16,
  # apart in fp32, so no bf16 bound can clear the ones left out.
  win = int(np.argmax(np.asarray(x_BD @ table_VD.T)[3]))
  table = np.asarray(table_VD).copy()
  for i in range(1, sampling.SCREEN_CANDIDATES + 4):
    table[(win + 7 * i) % 1000] = table[win] * (1 + 1e-6 * i)
  table_VD = jnp.asarray(table)
  token_B, fell_back = _screen(x_BD, table_VD, cfg)
  want_B = jnp.argmax(model_lib.output_logits(cfg, table_VD, x_BD), axis=-1)
  assert fell_back
  np.testing.assert_array_equal(token_B, want_B)


def test_screen_scores_near_ties_exactly():
  cfg = model_lib.build_config('tiny', 1000)
  x_BD, table_VD = _case(1)
  win = int(np.argmax(np.asarray(x_BD @ table_VD.T)[3]))
  table = np.asarray(table_VD).copy()
  table[(win + 7) % 1000] = table[win] * (1 + 1e-6)  # one twin, a hair ahead in fp32
  table_VD = jnp.asarray(table)
  token_B, fell_back = _screen(x_BD, table_VD, cfg)
  assert not fell_back and int(token_B[3]) == (win + 7) % 1000


def test_screen_bound_covers_bf16_error():
  x_BD, table_VD = _case(2, V=4000, D=640)
  exact_BV = np.asarray(x_BD, np.float64) @ np.asarray(table_VD, np.float64).T
  bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  approx_BV = bf16(x_BD) @ bf16(table_VD).T
  bound_B = (sampling.screen_bound(640) * np.linalg.norm(np.asarray(x_BD), axis=-1)
             * np.linalg.norm(np.asarray(table_VD), axis=-1).max())
  assert (np.abs(approx_BV - exact_BV).max(axis=-1) < bound_B).all()


@pytest.mark.parametrize('V', [1000, 1024, 40])
def test_blocked_top_k_is_top_k(V):
  v_BV = jnp.asarray(np.random.default_rng(V).normal(size=(5, V)).astype(np.float32))
  values, ids = sampling._top_k_blocked(v_BV, 17)
  want_values, want_ids = jax.lax.top_k(v_BV, 17)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(ids, want_ids)


def test_screen_compiles_to_top_k_kernels_not_sorts():
  # On a CPU, XLA runs a top_k as its TopK kernel only while the top_k's slice
  # of its sort is intact; a full sort of the candidate pool cost a tenth of a
  # Gemma decode step at batch 64.
  if jax.devices()[0].platform != 'cpu':
    pytest.skip('the TopK kernel is the CPU backend\'s')
  cfg = model_lib.build_config('tiny', 8192)
  x_BD, table_VD = _case(0, V=8192)  # more blocks than candidates, as in a real vocabulary
  hlo = jax.jit(lambda x, t: sampling.screened_argmax(
      x, t, t.astype(jnp.bfloat16), jnp.float32(1), cfg)).lower(x_BD, table_VD).compile().as_text()
  assert ' sort(' not in hlo and hlo.count('"TopK"') == 2
