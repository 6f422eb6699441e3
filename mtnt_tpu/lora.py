"""LoRA on Gemma's einsums with `gemma.peft`: adapters, the trainable split, merging.

With config.lora.rank > 0 every targeted `gemma.layers.Einsum` (attention
projections, feed-forward, or both) gains a low-rank adapter, output
`W x + (alpha / rank) * B(A x)`, B initialised to zero so training starts
from the base model exactly. Only adapter parameters are trained, kept in the
optimizer state and checkpointed; the base stays frozen and sharded, and a
checkpoint points at it through the run's config.json (config.model.checkpoint).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
from flax import linen as nn
from gemma import layers as gemma_layers
from gemma import peft
import jax.numpy as jnp

TARGETS = {
    'attention': ('q_einsum', 'kv_einsum', 'qkv_einsum', 'attn_vec_einsum'),
    'ffw': ('gating_einsum', 'linear'),
}
TARGETS['both'] = TARGETS['attention'] + TARGETS['ffw']
# A parameter path is an adapter's when one of its parts names one.
_ADAPTER = re.compile(r'(^|/)lora(_[a-z_]+)?(/|$)')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: str  # a key of TARGETS

  @classmethod
  def from_config(cls, cfg) -> 'LoraSpec | None':
    if not cfg.rank:
      return None
    if cfg.targets not in TARGETS:
      raise ValueError(f'config.lora.targets={cfg.targets!r}: use one of '
                       f'{", ".join(repr(t) for t in TARGETS)}')
    if cfg.rank < 0:
      raise ValueError(f'config.lora.rank={cfg.rank}: use a positive rank, or 0 for off')
    return cls(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)


def _target_name(module: gemma_layers.Einsum) -> str:
  # Attention einsums are modules named after themselves with a 'w' weight;
  # the feed-forward ones share the 'mlp' scope and are named by weight.
  return module.name if module.weight_name == 'w' else module.weight_name


class LoraEinsum(nn.Module):
  """`gemma.layers.Einsum` plus a scaled low-rank adapter (same call signature)."""
  wrapped: gemma_layers.Einsum
  rank: int
  scale: float

  def __post_init__(self):
    super().__post_init__()
    if self.scope is not None:  # transparent: the adapter sits beside the weight
      nn.share_scope(self, self.wrapped)

  @nn.compact
  def __call__(self, eqn: str, x):
    # The feed-forward einsums share one scope, so their adapters need
    # distinct names there: 'lora_gating_einsum', 'lora_linear'.
    name = 'lora' if self.wrapped.weight_name == 'w' else f'lora_{self.wrapped.weight_name}'
    adapter = peft.LoRAEinsumAdapter(name=name, rank=self.rank, einsum_str=eqn,
                                     shape=self.wrapped.shape, dtype=jnp.float32)
    return self.wrapped(eqn, x) + self.scale * adapter(x).astype(x.dtype)


def interceptor(spec: LoraSpec) -> peft.ModuleInterceptor:
  """Within it, the targeted einsums of any Gemma module carry adapters."""
  names = TARGETS[spec.targets]

  def replace(module):
    if isinstance(module, gemma_layers.Einsum) and _target_name(module) in names:
      # Named, not numbered: the feed-forward pair shares one scope.
      return LoraEinsum(wrapped=module, rank=spec.rank, scale=spec.alpha / spec.rank,
                        name=f'lora_wrapper_{_target_name(module)}')
    return module

  return peft.ModuleInterceptor(replace)


class LoraModel:
  """A Gemma module whose `init` and `apply` run inside the LoRA interceptor."""

  def __init__(self, base: nn.Module, spec: LoraSpec):
    self.base, self.spec = base, spec

  def init(self, *args, **kwargs):
    with interceptor(self.spec):
      return self.base.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with interceptor(self.spec):
      return self.base.apply(*args, **kwargs)


def is_adapter(path: str) -> bool:
  return bool(_ADAPTER.search(path))


def split(params: Any) -> tuple[dict, dict]:
  """(base, adapters): two nested dicts that `merge` puts back together."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep='/')
  return unflat(base), unflat(adapters)


def merge(base: dict, adapters: dict) -> dict:
  flat = flax.traverse_util.flatten_dict(base, sep='/')
  flat.update(flax.traverse_util.flatten_dict(adapters, sep='/'))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


# The einsum each target runs in gemma.modules (2.0.8), for folding adapters in.
_EQNS = {
    'q_einsum': 'BTD,NDH->BTNH',
    'kv_einsum': 'BSD,CKDH->CBSKH',
    'qkv_einsum': 'BTD,SNDH->SBTNH',
    'attn_vec_einsum': 'BTNH,NHD->BTD',
    'linear': '...H,HF->...F',
}


def _delta_eqn(eqn: str) -> str:
  """'a,b->w' for the weight update A B of the einsum `x,w->y`.

  `peft.LoRAEinsumAdapter` splits w's letters in two: A holds those the input
  shares (contracted or batch), then the rank; B the rank, then the rest.
  """
  x, rest = eqn.split(',')
  w = rest.split('->')[0]
  rank = next(c for c in 'rRzZ' if c not in eqn)
  a = ''.join(c for c in w if c in x) + rank
  b = rank + ''.join(c for c in w if c not in x)
  return f'{a},{b}->{w}'


def fold(base: dict, adapters: dict, spec: LoraSpec, transpose_gating: bool) -> dict:
  """Plain Gemma weights W + scale * (A B): what `export --merge` writes."""
  eqns = dict(_EQNS, gating_einsum='...F,NHF->...NH' if transpose_gating else '...F,NFH->...NH')
  flat = flax.traverse_util.flatten_dict(base, sep='/')
  ad = flax.traverse_util.flatten_dict(adapters, sep='/')
  scale = spec.alpha / spec.rank
  for path in list(flat):
    parts = path.split('/')
    target = parts[-2] if parts[-1] == 'w' else parts[-1]
    prefix = '/'.join(parts[:-1]) + '/lora' if parts[-1] == 'w' else (
        '/'.join(parts[:-1]) + f'/lora_{parts[-1]}')
    if f'{prefix}/a' not in ad:
      continue
    w = flat[path]
    delta = jnp.einsum(_delta_eqn(eqns[target]), ad[f'{prefix}/a'], ad[f'{prefix}/b'])
    flat[path] = (w + scale * delta.astype(jnp.float32)).astype(w.dtype)
  return flax.traverse_util.unflatten_dict(flat, sep='/')
