"""The weights laid out as the decoder's matmuls read them, so no token copies one.

XLA lowers each of gemma's einsums to a 2-D matmul. When a weight's axes are
not in the order that matmul reads them (q_einsum 'BTD,NDH->BTNH' contracts
D, its middle axis), XLA's CPU backend transposes it with a copy inside the
token loop: four weights of every layer, at every token (about 300 MB a token
for Gemma 3 270M, a fifth of a decode step in a profile at batch 64). Layout
assignment comes after loop-invariant code motion, so nothing hoists those
copies out of the loop.

`LoopLayout` moves them to where they are paid once per call: `record`
traces one token abstractly and notes each einsum's equation; `params`
transposes each weight into its `LOOP_ORDER`; `wrap` gives the model whose
einsums read that order, which XLA lowers to a matmul of the weight as it lies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
from gemma import layers as gemma_layers
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mtnt_tpu import model as model_lib


@dataclasses.dataclass(frozen=True)
class _Einsum:
  eqn: str  # as gemma calls it, e.g. 'BTD,NDH->BTNH'
  perm: tuple[int, ...]  # stored weight axis i = original axis perm[i]

  @property
  def loop_eqn(self) -> str:
    inputs, out = self.eqn.split('->')
    x, w = inputs.split(',')
    return f'{x},{"".join(w[i] for i in self.perm)}->{out}'


# The order XLA's CPU matmuls read each of gemma 2.0.8's einsum weights in
# without a copy, found in the compiled token loop (tests/test_decode.py checks
# that the loop copies no weight). Not by a rule: XLA picks the activations'
# layouts too (attn_vec reads [H, N, D]). Equations not listed keep their order
# (qkv_einsum, multi-head attention as in Gemma 1 7B: no test model has it).
LOOP_ORDER = {
    'BTD,NDH->BTNH': 'DNH',  # q_einsum
    'BSD,CKDH->CBSKH': 'CKHD',  # kv_einsum
    'BTNH,NHD->BTD': 'HND',  # attn_vec_einsum
    '...F,NFH->...NH': 'FNH',  # gating_einsum
    '...F,NHF->...NH': 'FNH',  # gating_einsum, transpose_gating_einsum (Gemma 3)
}


def _einsum(eqn: str) -> _Einsum:
  w = eqn.split('->')[0].split(',')[1]
  order = LOOP_ORDER.get(eqn, w)
  return _Einsum(eqn, tuple(w.index(a) for a in order))


def _is_einsum_call(context) -> bool:
  return isinstance(context.module, gemma_layers.Einsum) and context.method_name == '__call__'


@dataclasses.dataclass(frozen=True)
class LoopLayout:
  """Where each einsum weight lies in the loop layout: {param path: _Einsum}."""
  einsums: dict[tuple[str, ...], _Einsum]

  @classmethod
  def of(cls, cfg) -> LoopLayout:
    """The layout for a gemma TransformerConfig (recorded once per config: a
    server builds a Decoder per bucket, and tracing takes most of a second)."""
    return _recorded(cfg)

  @classmethod
  def record(cls, model: nn.Module) -> LoopLayout:
    """Each einsum's equation, from initialising `model` on one token traced
    abstractly (no FLOPs; initialising needs no weights at hand)."""
    einsums = {}

    def note(next_fun, args, kwargs, context):
      if _is_einsum_call(context):
        path = (*context.module.scope.path, context.module.weight_name)
        einsums[path] = _einsum(args[0])
      return next_fun(*args, **kwargs)

    def one_token(rng):
      with nn.intercept_methods(note):
        return model.init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                          None, jnp.ones((1, 1, 1), bool))

    jax.eval_shape(one_token, jax.random.key(0))
    return cls({p: e for p, e in einsums.items() if e.perm != tuple(range(len(e.perm)))})

  def params(self, tree):
    """The weights (arrays, ShapeDtypeStructs or NamedShardings) in the loop layout."""
    def move(path, x):
      e = self.einsums.get(tuple(k.key for k in path))
      if e is None:
        return x
      if isinstance(x, NamedSharding):
        spec = tuple(x.spec) + (None,) * (len(e.perm) - len(x.spec))
        return NamedSharding(x.mesh, PartitionSpec(*(spec[i] for i in e.perm)))
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[i] for i in e.perm), x.dtype,
                                    sharding=x.sharding and move(path, x.sharding))
      return jnp.transpose(x, e.perm)
    return jax.tree_util.tree_map_with_path(move, tree,
                                            is_leaf=lambda x: isinstance(x, NamedSharding))

  def wrap(self, model: nn.Module) -> LaidOutModel:
    """`model`, applied to weights in the loop layout."""
    return LaidOutModel(model, self)


@functools.lru_cache(maxsize=None)
def _recorded(cfg) -> LoopLayout:
  return LoopLayout.record(model_lib.make_model(cfg))


class LaidOutModel:
  """A Gemma module whose `apply` reads its einsum weights in a `LoopLayout`
  (`.base` is the module, as for `lora.LoraModel`)."""

  def __init__(self, base: nn.Module, layout: LoopLayout):
    self.base, self.layout = base, layout

  def apply(self, *args, **kwargs) -> Any:
    einsums = self.layout.einsums

    def read(next_fun, call_args, call_kwargs, context):
      module = context.module
      e = _is_einsum_call(context) and einsums.get((*module.scope.path, module.weight_name))
      if not e:
        return next_fun(*call_args, **call_kwargs)
      eqn, x = call_args
      assert eqn == e.eqn, f'{module.scope.path}: recorded {e.eqn}, called with {eqn}'
      return jnp.einsum(e.loop_eqn, x, module.get_variable('params', module.weight_name))

    with nn.intercept_methods(read):
      return self.base.apply(*args, **kwargs)
