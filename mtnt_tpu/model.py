"""Gemma variants by name, and the forward pass on packed rows.

The network is the classic `gemma.transformer.Transformer`; this module adds
what a trainer needs around it: variants chosen by config (never guessed from
layer counts: Gemma 3 270M and Gemma 2B both have 18 layers), a
segment-aware causal mask so packed examples never attend to each other.
Checkpoint formats (Kaggle, Hugging Face, GGUF) live in `mtnt_tpu.formats`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp
from gemma import layers as gemma_layers
from gemma import modules as gemma_modules
from gemma import transformer as gemma_transformer

Params = Any  # nested dict: {'embedder': ..., 'layer_0': ..., 'final_norm': ...}
TransformerConfig = gemma_transformer.TransformerConfig
_GLOBAL = gemma_modules.AttentionType.GLOBAL
_LOCAL = gemma_modules.AttentionType.LOCAL_SLIDING


def _gemma3(num_layers: int, embed_dim: int, hidden_dim: int, num_heads: int,
            num_embed: int | None = 262_144, window: int = 512) -> TransformerConfig:
  # Gemma 3: five sliding-window layers to one global, qk-norm instead of
  # soft-capping, and a longer RoPE base for the global layers.
  pattern = ((_LOCAL,) * 5 + (_GLOBAL,)) * (num_layers // 6 + 1)
  return TransformerConfig(
      num_layers=num_layers, num_embed=num_embed, embed_dim=embed_dim,
      hidden_dim=hidden_dim, num_heads=num_heads, head_dim=256, num_kv_heads=1,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=pattern[:num_layers], max_cache_length=None,
      sliding_window_size=window, transpose_gating_einsum=True, use_qk_norm=True,
      local_base_frequency=10_000, global_base_frequency=1_000_000)


def _tiny(num_layers: int, embed_dim: int, *, gemma2: bool = False,
          gemma3: bool = False) -> TransformerConfig:
  # num_embed None: the tokenizer's vocabulary size decides (see build_config).
  if gemma2:  # local/global alternation, post norms and soft-capping, as in Gemma 2
    return dataclasses.replace(
        TransformerConfig.gemma2_2b(None), num_layers=num_layers, num_embed=None,
        embed_dim=embed_dim, hidden_dim=4 * embed_dim, num_heads=4, head_dim=embed_dim // 4,
        num_kv_heads=2, attention_types=(_LOCAL, _GLOBAL) * (num_layers // 2),
        sliding_window_size=64)
  if gemma3:
    cfg = _gemma3(num_layers, embed_dim, 4 * embed_dim, num_heads=4, num_embed=None)
    return dataclasses.replace(cfg, head_dim=embed_dim // 4, sliding_window_size=64)
  return TransformerConfig(
      num_layers=num_layers, num_embed=None, embed_dim=embed_dim,
      hidden_dim=4 * embed_dim, num_heads=4, head_dim=embed_dim // 4,
      num_kv_heads=1, final_logit_softcap=None, use_post_attn_norm=False,
      use_post_ffw_norm=False, attention_types=(_GLOBAL,) * num_layers,
      max_cache_length=None)


VARIANTS: dict[str, Callable[[], TransformerConfig]] = {
    'gemma_2b': lambda: TransformerConfig.gemma_2b(None),
    'gemma_7b': lambda: TransformerConfig.gemma_7b(None),
    'gemma2_2b': lambda: TransformerConfig.gemma2_2b(None),
    'gemma2_9b': lambda: TransformerConfig.gemma2_9b(None),
    'gemma3_270m': lambda: _gemma3(18, 640, 2048, num_heads=4),
    'gemma3_1b': lambda: _gemma3(26, 1152, 6912, num_heads=4),
    'tiny': lambda: _tiny(2, 128),
    'tiny_4l': lambda: _tiny(4, 256),
    'tiny_gemma2': lambda: _tiny(4, 128, gemma2=True),
    'tiny_gemma3': lambda: _tiny(4, 128, gemma3=True),
}


def check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(
        f'config.model.variant={variant!r} is not a known variant; '
        f'use one of {", ".join(sorted(VARIANTS))}')


def build_config(variant: str, vocab_size: int) -> TransformerConfig:
  """The variant's TransformerConfig; tiny variants take the tokenizer's vocab."""
  check_variant(variant)
  cfg = VARIANTS[variant]()
  if cfg.num_embed is None:
    return dataclasses.replace(cfg, num_embed=vocab_size)
  if vocab_size > cfg.num_embed:
    raise ValueError(
        f'the tokenizer has {vocab_size} pieces but {variant} embeds only '
        f'{cfg.num_embed}; set config.tokenizer.path to the Gemma tokenizer')
  return cfg


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """[B, L, L] causal mask confined to each packed example; 0 marks padding."""
  L = segment_ids_BL.shape[-1]
  causal_LL = jnp.tril(jnp.ones((L, L), dtype=jnp.bool_))
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  real_B1L = (segment_ids_BL != 0)[:, None, :]
  return causal_LL[None] & same_BLL & real_B1L


# Backward-pass memory against recompute, by config.model.remat. 'matmuls'
# saves dot outputs without batch dimensions (the projections and MLP), so the
# attention logits [B, N, L, L], a batched dot, are recomputed, not kept.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'block': None,  # nn.remat's None: keep only the block's inputs
    'matmuls': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)


class RematTransformer(gemma_transformer.Transformer):
  """gemma's Transformer with every block under `nn.remat(policy=remat_policy)`.

  The parameter tree is the parent's ('layer_0/attn/q_einsum/w', ...), so
  Kaggle checkpoints load unchanged.
  """
  remat_policy: Callable[..., bool] | None = None

  def setup(self):
    # Mirrors gemma_transformer.Transformer.setup (gemma 2.0.8) with the block
    # class swapped. Not reused: gemma builds its blocks inline from the
    # module-global `modules.Block` (no class attribute or factory to override),
    # and flax refuses to re-create `layer_i` after super().setup()
    # (NameInUseError). tests/test_remat.py compares loss, gradients and tree.
    c = self.config
    block_cls = nn.remat(gemma_modules.Block, policy=self.remat_policy)
    self.embedder = gemma_modules.Embedder(vocab_size=c.num_embed, embed_dim=c.embed_dim)
    self.blocks = [
        block_cls(
            name=f'layer_{i}',
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            embed_dim=c.embed_dim,
            head_dim=c.head_dim,
            hidden_dim=c.hidden_dim,
            sliding_window_size=c.sliding_window_size,
            use_post_attn_norm=c.use_post_attn_norm,
            use_post_ffw_norm=c.use_post_ffw_norm,
            attn_logits_soft_cap=c.attn_logits_soft_cap,
            attn_type=attn_type,
            query_pre_attn_scalar=c.query_pre_attn_scalar(),
            transpose_gating_einsum=c.transpose_gating_einsum,
            use_qk_norm=c.use_qk_norm,
            rope_base_frequency=(c.local_base_frequency if attn_type == _LOCAL
                                 else c.global_base_frequency),
        )
        for i, attn_type in zip(range(c.num_layers), c.attention_types)
    ]
    self.final_norm = gemma_layers.RMSNorm()


def make_model(cfg: TransformerConfig, remat: str = 'none') -> nn.Module:
  """The Gemma network; `remat` is one of REMAT_CHOICES (config.model.remat)."""
  if remat == 'none':
    return gemma_transformer.Transformer(cfg)
  if remat not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat={remat!r}: use one of '
                     f'{", ".join(repr(r) for r in REMAT_CHOICES)}')
  return RematTransformer(cfg, remat_policy=REMAT_POLICIES[remat])


def forward(model: nn.Module, params: Params, inputs_BL: jax.Array,
            positions_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
  """Logits [B, L, V] for packed rows (segment ids 1.., 0 = padding)."""
  logits_BLV, _ = model.apply(
      {'params': params}, inputs_BL, positions_BL, None,
      attention_mask(segment_ids_BL))
  return logits_BLV


def network_config(model) -> TransformerConfig:
  """The TransformerConfig of a Gemma module, LoRA-wrapped or not."""
  return getattr(model, 'base', model).config


def final_hidden(module: gemma_transformer.Transformer, tokens_BL, positions_BL, cache,
                 mask_BLL):
  """gemma 2.0.8's Transformer.__call__ up to the final norm, on its own modules:
  activations [B, L, D] and the updated cache (None without one). The
  unembedding is left to the caller (the loss runs it a chunk at a time, greedy
  decoding screens it in bf16). Use as `model.apply(..., method=final_hidden)`."""
  cache = None if cache is None else dict(cache)  # the caller's stays as it was
  x_BLD = module.embedder.encode(tokens_BL)
  for i, block in enumerate(module.blocks):
    name = f'layer_{i}'
    layer_cache, x_BLD = block(x_BLD, positions_BL, cache[name] if cache else None, mask_BLL)
    if cache is not None:
      cache[name] = layer_cache
  return module.final_norm(x_BLD), cache


def hidden_states(model: nn.Module, params: Params, inputs_BL: jax.Array,
                  positions_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
  """Final-norm activations [B, L, D]: `forward` without the [B, L, V] unembedding."""
  x_BLD, _ = model.apply({'params': params}, inputs_BL, positions_BL, None,
                         attention_mask(segment_ids_BL), method=final_hidden)
  return x_BLD


def output_logits(cfg: TransformerConfig, table_VD: jax.Array, x_TD: jax.Array) -> jax.Array:
  """Logits [T, V] from final hidden states, as gemma's Transformer ends (2.0.8)."""
  embedder = gemma_modules.Embedder(vocab_size=cfg.num_embed, embed_dim=cfg.embed_dim)
  logits_TV = embedder.apply({'params': {'input_embedding': table_VD}}, x_TD,
                             method=gemma_modules.Embedder.decode)
  if cfg.final_logit_softcap is not None:
    logits_TV /= cfg.final_logit_softcap
    logits_TV = jnp.tanh(logits_TV) * cfg.final_logit_softcap
  return logits_TV


def init_params(model: nn.Module, rng: jax.Array, param_dtype: str = 'float32') -> Params:
  x_BL = jnp.zeros((1, 4), jnp.int32)
  params = model.init(rng, x_BL, x_BL, None, jnp.ones((1, 4, 4), jnp.bool_))['params']
  return jax.tree.map(lambda p: p.astype(param_dtype), params)


def abstract_params(model: nn.Module, param_dtype: str = 'float32') -> Params:
  return jax.eval_shape(
      functools.partial(init_params, model, param_dtype=param_dtype),
      jax.random.key(0))
