"""Variants, the segment-aware mask, and Kaggle Flax checkpoints."""

import os

import jax
import numpy as np
import pytest
from gemma import params as gemma_params
from jax.sharding import PartitionSpec as P

from mtnt_tpu import model as model_lib
from mtnt_tpu import state as state_lib
from mtnt_tpu import train
from mtnt_tpu.formats import kaggle
from tests import helpers


def test_variants_are_named_not_guessed():
  # Gemma 3 270M and Gemma 2B both have 18 layers; the config decides.
  a = model_lib.build_config('gemma3_270m', 0)
  b = model_lib.build_config('gemma_2b', 0)
  assert a.num_layers == b.num_layers == 18
  assert (a.embed_dim, a.use_qk_norm, a.global_base_frequency) == (640, True, 1_000_000)
  assert (b.embed_dim, b.use_qk_norm) == (2048, False)


@pytest.mark.parametrize('variant,millions', [
    ('gemma_2b', 2506), ('gemma3_270m', 268), ('gemma3_1b', 1000), ('gemma2_2b', 2615)])
def test_parameter_counts(variant, millions):
  params = model_lib.abstract_params(model_lib.make_model(model_lib.build_config(variant, 0)))
  assert sum(p.size for p in jax.tree.leaves(params)) / 1e6 == pytest.approx(millions, rel=2e-3)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match=r"variant='gemma_3b'.*one of .*gemma_2b"):
    model_lib.build_config('gemma_3b', 800)


def test_attention_mask_stays_inside_each_example():
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  m = np.asarray(model_lib.attention_mask(seg))[0]
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, expected)


def _write_kaggle_checkpoint(tmp_path, variant='tiny', seed=1):
  """A checkpoint in the layout Kaggle ships, written by gemma's own saver."""
  cfg = model_lib.build_config(variant, 800)
  params = model_lib.init_params(model_lib.make_model(cfg), jax.random.key(seed))
  params = jax.tree.map(np.asarray, params)
  path = os.path.join(tmp_path, 'kaggle', '2b')
  gemma_params.format_and_save_params({'transformer': params}, path)
  return path, params


def test_kaggle_checkpoint_layout_is_gemmas(tmp_path):
  """The project's layout functions agree with what gemma's saver writes."""
  path, params = _write_kaggle_checkpoint(tmp_path)
  raw = gemma_params.load_params(path)
  ours = kaggle.to_kaggle_layout(params)
  assert 'transformer/layer_0/mlp/linear' in ours and 'w' in ours['transformer/layer_0/mlp/linear']
  assert jax.tree.structure(ours) == jax.tree.structure(raw)
  jax.tree.map(np.testing.assert_array_equal, raw, ours)
  jax.tree.map(np.testing.assert_array_equal, kaggle.from_kaggle_layout(raw), params)


def test_load_kaggle_restores_equal_weights_in_their_shardings(tmp_path):
  path, params = _write_kaggle_checkpoint(tmp_path)
  run = train.build(helpers.tiny_config(**{'model.checkpoint': path}))
  state = state_lib.load_pretrained(run)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, params)
  emb = state.params['embedder']['input_embedding']
  assert emb.sharding.spec == P('fsdp', None)
  # Each device holds only its shard: 800 rows over fsdp=4.
  assert {s.data.shape for s in emb.addressable_shards} == {(200, 128)}
  assert state.opt_state[1][0].mu['layer_1']['mlp']['linear'].sharding.spec == P('fsdp', None)


@pytest.mark.slow
def test_checkpoint_of_another_variant_names_both_shapes(tmp_path):
  path, _ = _write_kaggle_checkpoint(tmp_path, variant='tiny_4l')
  run = train.build(helpers.tiny_config(**{'model.checkpoint': path}))
  with pytest.raises(ValueError, match=r'shape \(800, 256\).*expects \(800, 128\)'):
    state_lib.load_pretrained(run)
