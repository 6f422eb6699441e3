"""A checkpoint's architecture, as its own config says, checked against the variant.

Hugging Face's config.json and GGUF's metadata both describe the network
they hold; each format reads its file into an `Arch`, and `check` compares it
with the configured variant before a byte of weights is read.
"""

from __future__ import annotations

import dataclasses

from mtnt_tpu import model as model_lib
from mtnt_tpu.formats import layout


@dataclasses.dataclass(frozen=True)
class Arch:
  generation: int  # Gemma 1, 2 or 3
  num_layers: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int

  @classmethod
  def of(cls, cfg: model_lib.TransformerConfig) -> 'Arch':
    return cls(layout.generation(cfg), cfg.num_layers, cfg.embed_dim, cfg.hidden_dim,
               cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_embed)

  def describe(self) -> str:
    return (f'Gemma {self.generation}, {self.num_layers} layers, width {self.embed_dim}, '
            f'ffw {self.hidden_dim}, {self.num_heads}x{self.head_dim} heads '
            f'({self.num_kv_heads} kv), vocab {self.vocab_size}')


def check(found: Arch, cfg: model_lib.TransformerConfig, variant: str, where: str) -> None:
  """Stops with both descriptions when the file holds another network than `variant`."""
  want = Arch.of(cfg)
  if found == want:
    return
  fits = [name for name in sorted(model_lib.VARIANTS)
          if _fits(found, model_lib.VARIANTS[name]())]
  hint = (f'set config.model.variant={fits[0]!r}' if fits
          else 'set config.model.variant to the checkpoint\'s variant')
  raise ValueError(f'config.model.variant={variant!r} is {want.describe()}, but {where} holds '
                   f'{found.describe()}; {hint}')


def _fits(found: Arch, cfg: model_lib.TransformerConfig) -> bool:
  # Tiny variants take their vocabulary from the tokenizer: any size fits.
  vocab = found.vocab_size if cfg.num_embed is None else cfg.num_embed
  return Arch.of(dataclasses.replace(cfg, num_embed=vocab)) == found
