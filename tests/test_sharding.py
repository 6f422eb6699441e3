"""The sharding rules, the mesh and their errors."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mtnt_tpu import model as model_lib
from mtnt_tpu import sharding


def test_mesh_resolves_minus_one():
  mesh = sharding.make_mesh(2, -1)
  assert dict(mesh.shape) == {'dcn_data': 1, 'data': 2, 'fsdp': 4}


@pytest.mark.parametrize('data,fsdp,msg', [
    (3, -1, 'must divide the device count'),
    (2, 2, 'multiplies to 4 but there are 8 devices'),
    (-1, -1, 'only one axis may be -1'),
    (0, 8, 'use a positive size'),
])
def test_bad_mesh_names_the_fix(data, fsdp, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.make_mesh(data, fsdp)


def test_dcn_data_axis_is_outermost():
  mesh = sharding.make_mesh(1, -1, dcn_data=2)
  assert dict(mesh.shape) == {'dcn_data': 2, 'data': 1, 'fsdp': 4}
  assert sharding.batch_divisor(mesh) == 8


def test_gemma_2b_rules_give_intended_specs():
  mesh = sharding.make_mesh(1, -1)
  params = model_lib.abstract_params(model_lib.make_model(model_lib.build_config('gemma_2b', 0)))
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(params, mesh))
  assert specs['embedder']['input_embedding'] == P('fsdp', None)  # [V, D]
  layer = specs['layer_7']
  assert layer['attn']['q_einsum']['w'] == P(None, 'fsdp', None)  # [N, D, H]
  assert layer['attn']['kv_einsum']['w'] == P(None, None, 'fsdp', None)  # [2, K, D, H]
  assert layer['attn']['attn_vec_einsum']['w'] == P(None, None, 'fsdp')  # [N, H, D]
  assert layer['mlp']['gating_einsum'] == P(None, 'fsdp', None)
  assert layer['mlp']['linear'] == P('fsdp', None)
  assert layer['pre_attention_norm']['scale'] == P()
  assert specs['final_norm']['scale'] == P()


def test_gemma_7b_uses_fused_qkv_rule():
  mesh = sharding.make_mesh(1, -1)
  params = model_lib.abstract_params(model_lib.make_model(model_lib.build_config('gemma_7b', 0)))
  spec = sharding.tree_shardings(params, mesh)['layer_0']['attn']['qkv_einsum']['w'].spec
  assert spec == P(None, None, 'fsdp', None)  # [3, N, D, H]


def test_optimizer_moments_follow_their_parameter():
  import optax
  mesh = sharding.make_mesh(1, -1)
  params = model_lib.abstract_params(model_lib.make_model(model_lib.build_config('tiny', 800)))
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  shardings = sharding.tree_shardings(opt_state, mesh)
  mu = shardings[0].mu
  assert mu['layer_0']['mlp']['linear'].spec == P('fsdp', None)
  assert shardings[0].count.spec == P()


def test_indivisible_dimension_is_replicated_not_an_error():
  mesh = sharding.make_mesh(1, -1)  # fsdp = 8
  spec = sharding.spec_for('layer_0/mlp/linear', (12, 16), mesh)
  assert spec == P(None, None)


def test_describe_prints_one_row_per_layer_pattern():
  mesh = sharding.make_mesh(1, -1)
  params = model_lib.abstract_params(model_lib.make_model(model_lib.build_config('tiny_4l', 800)))
  table = sharding.describe(params, sharding.tree_shardings(params, mesh))
  assert 'layer_*/attn/q_einsum/w' in table
  assert 'layer_3' not in table
