"""Gemma's tensors as Hugging Face and GGUF name them, against gemma's Flax params.

One table per Gemma generation names every tensor in both formats; one `Rule`
per Flax parameter says which of those tensors it is made of and how they are
reshaped and transposed. Both formats store a matrix as [out, in] (GGUF's
dequantised rows are Hugging Face's rows), so one set of rules serves both.
The same name means different things across generations: Gemma 1's
`post_attention_layernorm` is the norm before the feed-forward block, Gemma 2
and 3's is the norm after attention.

A rule maps any slice of a Flax parameter to the slices of its source tensors,
so a device's shard is read without reading the rest of the tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Protocol

import flax
from gemma import transformer as gemma_transformer
import jax
import numpy as np

TransformerConfig = gemma_transformer.TransformerConfig

# role -> (Hugging Face name, GGUF name); {i} is the layer. Gemma 2 and 3 add
# what Gemma 1 lacks and rename the norm around the feed-forward block.
_GEMMA1 = {
    'embed': ('model.embed_tokens.weight', 'token_embd.weight'),
    'final_norm': ('model.norm.weight', 'output_norm.weight'),
    'q': ('model.layers.{i}.self_attn.q_proj.weight', 'blk.{i}.attn_q.weight'),
    'k': ('model.layers.{i}.self_attn.k_proj.weight', 'blk.{i}.attn_k.weight'),
    'v': ('model.layers.{i}.self_attn.v_proj.weight', 'blk.{i}.attn_v.weight'),
    'o': ('model.layers.{i}.self_attn.o_proj.weight', 'blk.{i}.attn_output.weight'),
    'gate': ('model.layers.{i}.mlp.gate_proj.weight', 'blk.{i}.ffn_gate.weight'),
    'up': ('model.layers.{i}.mlp.up_proj.weight', 'blk.{i}.ffn_up.weight'),
    'down': ('model.layers.{i}.mlp.down_proj.weight', 'blk.{i}.ffn_down.weight'),
    'pre_attention_norm': ('model.layers.{i}.input_layernorm.weight',
                           'blk.{i}.attn_norm.weight'),
    'pre_ffw_norm': ('model.layers.{i}.post_attention_layernorm.weight',
                     'blk.{i}.ffn_norm.weight'),
}
_GEMMA2 = {
    **_GEMMA1,
    'pre_ffw_norm': ('model.layers.{i}.pre_feedforward_layernorm.weight',
                     'blk.{i}.ffn_norm.weight'),
    'post_attention_norm': ('model.layers.{i}.post_attention_layernorm.weight',
                            'blk.{i}.post_attention_norm.weight'),
    'post_ffw_norm': ('model.layers.{i}.post_feedforward_layernorm.weight',
                      'blk.{i}.post_ffw_norm.weight'),
}
_GEMMA3 = {
    **_GEMMA2,
    'query_norm': ('model.layers.{i}.self_attn.q_norm.weight', 'blk.{i}.attn_q_norm.weight'),
    'key_norm': ('model.layers.{i}.self_attn.k_norm.weight', 'blk.{i}.attn_k_norm.weight'),
}
NAMES: dict[int, dict[str, tuple[str, str]]] = {1: _GEMMA1, 2: _GEMMA2, 3: _GEMMA3}
HF, GGUF = 0, 1  # columns of NAMES


def generation(cfg: TransformerConfig) -> int:
  """Gemma 1, 2 or 3, by the features that set them apart."""
  if cfg.use_qk_norm:
    return 3
  return 2 if cfg.use_post_attn_norm else 1


def is_norm(role: str) -> bool:
  """Norm weights: llama.cpp stores them as (1 + w), gemma and HF as w."""
  return role.endswith('norm')


@dataclasses.dataclass(frozen=True)
class Rule:
  """A Flax parameter built from source tensors ([out, in] matrices or vectors).

  Each source is reshaped so that its axis a becomes the axes `split[a]`, then
  transposed by `perm`; several sources are stacked on a new leading axis.
  """
  roles: tuple[str, ...]
  layer: int | None
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def stacked(self) -> bool:
    return len(self.roles) > 1

  def source_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(group) for group in self.split)

  def flax_shape(self) -> tuple[int, ...]:
    axes = [n for group in self.split for n in group]
    part = tuple(axes[p] for p in self.perm)
    return (len(self.roles), *part) if self.stacked else part

  def names(self, table: dict[str, tuple[str, str]], column: int) -> tuple[str, ...]:
    return tuple(table[r][column].format(i=self.layer) for r in self.roles)

  def read(self, read_source: Callable[[int, tuple[slice, ...]], np.ndarray],
           index: tuple[slice, ...]) -> np.ndarray:
    """The Flax slice `index`; read_source(k, slices) reads source k's slices."""
    index = tuple(index) + (slice(None),) * (len(self.flax_shape()) - len(index))
    if not self.stacked:
      return self._read_part(lambda s: read_source(0, s), index)
    which = range(*index[0].indices(len(self.roles)))
    return np.stack([self._read_part(lambda s, k=k: read_source(k, s), index[1:])
                     for k in which])

  def _read_part(self, read, index: tuple[slice, ...]) -> np.ndarray:
    axes = [n for group in self.split for n in group]
    by_axis: list[slice] = [slice(None)] * len(axes)
    for j, p in enumerate(self.perm):
      by_axis[p] = index[j]
    source_slices, block_shape, within = [], [], []
    a = 0
    for group in self.split:
      # A source axis split into (n0, n1, ...): read the rows of the slice of
      # n0 whole, reshape, then take the slices of n1, ... from them.
      bounds = [by_axis[a + g].indices(n)[:2] for g, n in enumerate(group)]
      inner = math.prod(group[1:])
      (start, stop), rest = bounds[0], bounds[1:]
      source_slices.append(slice(start * inner, stop * inner))
      block_shape += [stop - start, *group[1:]]
      within += [slice(None), *(slice(*b) for b in rest)]
      a += len(group)
    block = read(tuple(source_slices)).reshape(block_shape)[tuple(within)]
    return block.transpose(self.perm)

  def to_sources(self, flax_array: np.ndarray) -> list[np.ndarray]:
    """The inverse: a whole Flax array -> its source tensors."""
    parts = list(flax_array) if self.stacked else [flax_array]
    inverse = tuple(np.argsort(self.perm))
    return [np.ascontiguousarray(p.transpose(inverse).reshape(self.source_shape()))
            for p in parts]


def rules(cfg: TransformerConfig) -> dict[str, Rule]:
  """Every Flax parameter path ('layer_0/attn/q_einsum/w') -> its rule."""
  D, F, N, K, H = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  gen = generation(cfg)
  out = {'embedder/input_embedding': Rule(('embed',), None, ((cfg.num_embed,), (D,)), (0, 1)),
         'final_norm/scale': Rule(('final_norm',), None, ((D,),), (0,))}
  for i in range(cfg.num_layers):
    rule = lambda roles, split, perm: Rule(roles, i, split, perm)
    p = f'layer_{i}/'
    if N == K:  # gemma's qkv_einsum: one [3, N, D, H] weight
      out[p + 'attn/qkv_einsum/w'] = rule(('q', 'k', 'v'), ((N, H), (D,)), (0, 2, 1))
    else:
      out[p + 'attn/q_einsum/w'] = rule(('q',), ((N, H), (D,)), (0, 2, 1))
      out[p + 'attn/kv_einsum/w'] = rule(('k', 'v'), ((K, H), (D,)), (0, 2, 1))
    out[p + 'attn/attn_vec_einsum/w'] = rule(('o',), ((D,), (N, H)), (1, 2, 0))
    # gating_einsum is [2, F, D] (transposed, Gemma 3 checkpoints) or [2, D, F].
    out[p + 'mlp/gating_einsum'] = rule(('gate', 'up'), ((F,), (D,)),
                                        (0, 1) if cfg.transpose_gating_einsum else (1, 0))
    out[p + 'mlp/linear'] = rule(('down',), ((D,), (F,)), (1, 0))
    norms = ['pre_attention_norm', 'pre_ffw_norm']
    norms += ['post_attention_norm'] if cfg.use_post_attn_norm else []
    norms += ['post_ffw_norm'] if cfg.use_post_ffw_norm else []
    for norm in norms:
      out[p + f'{norm}/scale'] = rule((norm,), ((D,),), (0,))
    if gen == 3:
      out[p + 'attn/_query_norm/scale'] = rule(('query_norm',), ((H,),), (0,))
      out[p + 'attn/_key_norm/scale'] = rule(('key_norm',), ((H,),), (0,))
  return out


def sources(cfg: TransformerConfig, column: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
  """(role, file name, [out, in] shape) of every tensor a checkpoint of `cfg` holds."""
  table = NAMES[generation(cfg)]
  for rule in rules(cfg).values():
    for role, name in zip(rule.roles, rule.names(table, column)):
      yield role, name, rule.source_shape()


class Source(Protocol):
  """A checkpoint file set that can read parts of its tensors."""
  where: str  # for messages: the path a user passed

  def shape(self, name: str) -> tuple[int, ...] | None:
    """[out, in] shape of tensor `name`; None if the file lacks it."""

  def read(self, role: str, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    """The slices of tensor `name` (whose role is `role`), as stored in gemma's terms."""


def check_tensors(source: Source, cfg: TransformerConfig, column: int, variant: str) -> None:
  """Every tensor the variant needs is there, at its shape; one line if not."""
  for role, name, shape in sources(cfg, column):
    got = source.shape(name)
    if got is None:
      raise ValueError(f'{source.where} lacks {name} ({role} of {variant}); the checkpoint is '
                       'incomplete or of another model: check config.model.checkpoint')
    if tuple(got) != shape:
      raise ValueError(f'{source.where} has {name} of shape {tuple(got)}, {variant} expects '
                       f'{shape}; set config.model.variant to the checkpoint\'s variant')


def assemble(source: Source, cfg: TransformerConfig, column: int, target: Any) -> Any:
  """`target`'s tree (ShapeDtypeStructs with shardings) read from `source`.

  Each device's shard is read on its own from the slices of the source tensors
  it covers, so a host holds at most one shard beyond what its devices keep.
  """
  table = NAMES[generation(cfg)]
  by_path = rules(cfg)
  flat = flax.traverse_util.flatten_dict(target, sep='/')
  unknown = sorted(set(flat) - set(by_path))
  if unknown:
    raise ValueError(f'no rule reads {unknown[0]} from {source.where}; '
                     'is this a gemma.transformer.Transformer parameter tree?')

  def one(path: str, leaf) -> jax.Array:
    rule = by_path[path]
    names = rule.names(table, column)
    if tuple(leaf.shape) != rule.flax_shape():
      raise ValueError(f'{path}: the target has shape {tuple(leaf.shape)}, the rule builds '
                       f'{rule.flax_shape()}')
    done: dict[tuple, np.ndarray] = {}  # replicas of a shard read it once

    def shard(index: tuple[slice, ...]) -> np.ndarray:
      key = tuple(s.indices(n)[:2] for s, n in zip(index, leaf.shape))
      if key not in done:
        block = rule.read(lambda k, s: source.read(rule.roles[k], names[k], s), index)
        done[key] = block.astype(leaf.dtype)
      return done[key]

    sharding = getattr(leaf, 'sharding', None) or jax.sharding.SingleDeviceSharding(
        jax.devices()[0])
    return jax.make_array_from_callback(tuple(leaf.shape), sharding, shard)

  return flax.traverse_util.unflatten_dict({p: one(p, leaf) for p, leaf in flat.items()},
                                           sep='/')
