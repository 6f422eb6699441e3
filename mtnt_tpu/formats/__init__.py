"""Checkpoint formats: which one a path is, and one `load` for all of them.

    kaggle  a Kaggle Flax dir (orbax tree; tokenizer.model beside it or above)
    hf      a Hugging Face dir (config.json, safetensors, tokenizer.model)
    gguf    a .gguf file (weights, quantised or not, and the tokenizer as metadata)

`config.model.checkpoint` may name any of them; the variant is still named by
`config.model.variant`, and checked against the file's own config before any
weights are read.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from mtnt_tpu import model as model_lib
from mtnt_tpu.formats import hf
from mtnt_tpu.formats import kaggle
from mtnt_tpu.formats import peft

KAGGLE, HF, GGUF, PEFT = 'kaggle', 'hf', 'gguf', 'peft'
# Where a GGUF's rebuilt tokenizer goes (one file per distinct vocabulary).
CACHE_DIR = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                         'mtnt_tpu')


def detect(path: str) -> str:
  """kaggle, hf or gguf; one line naming what each needs if it is none of them."""
  if '://' in path:
    return KAGGLE  # orbax reads buckets; the other formats are local files
  if path.endswith('.gguf') and os.path.isfile(path):
    return GGUF
  if os.path.isdir(path) and hf.is_hf_dir(path):
    return HF
  if os.path.isdir(path):
    return KAGGLE
  what = 'does not exist' if not os.path.exists(path) else 'is not a checkpoint'
  raise FileNotFoundError(
      f'config.model.checkpoint={path!r} {what}; point it at a Kaggle Flax checkpoint dir, '
      'a Hugging Face model dir (config.json + safetensors) or a .gguf file')


def load(path: str, target: Any, variant: str) -> Any:
  """The checkpoint's weights in `target`'s shapes, dtypes and shardings.

  `target` is the abstract parameter tree (ShapeDtypeStructs with shardings).
  A wrong variant, a missing tensor, a wrong shape or a truncated file stops
  with one line before anything is read into the devices.
  """
  fmt = detect(path)
  if fmt == KAGGLE:
    return kaggle.load(path, target)
  vocab = target['embedder']['input_embedding'].shape[0]
  cfg = model_lib.build_config(variant, vocab)
  if fmt == HF:
    return hf.load(path, target, cfg, variant)
  from mtnt_tpu.formats import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load(path, target, cfg, variant)


def tokenizer_path(tokenizer: str, checkpoint: str) -> str:
  """config.tokenizer.path, else the tokenizer that comes with config.model.checkpoint."""
  if tokenizer or checkpoint in ('', 'random'):
    return tokenizer
  fmt = detect(checkpoint)
  if fmt == GGUF:
    from mtnt_tpu.formats import gguf  # pylint: disable=g-import-not-at-top
    return gguf.write_tokenizer(checkpoint, CACHE_DIR)
  # Kaggle ships .../2b/2/{2b/, tokenizer.model}; HF keeps it in the model dir.
  near = [checkpoint, os.path.dirname(checkpoint.rstrip('/'))]
  for d in near if fmt == KAGGLE else near[:1]:
    candidate = os.path.join(d, hf.TOKENIZER)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
      f'config.tokenizer.path is empty and no {hf.TOKENIZER} is in {" or ".join(near)}; '
      'set config.tokenizer.path to the SentencePiece model of config.model.checkpoint')


def save(fmt: str, params: Any, cfg: model_lib.TransformerConfig, out: str, *, tokenizer: str,
         dtype: str | None = None, name: str = 'model',
         manifest: tuple[str, dict] | None = None, lora: dict | None = None) -> str:
  """Writes `params` as `fmt` into the new dir OUT, whole or not at all.

  OUT holds the weights (kaggle: OUT/NAME; hf, peft: OUT itself), tokenizer.model
  and the optional (file name, JSON) manifest. For peft, `params` are the LoRA
  adapters and `lora` holds peft.save's rank, alpha and base_model. Returns
  the path a loader takes.
  """
  out = os.path.abspath(os.path.expanduser(out))  # orbax refuses relative paths
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} already exists; nothing is overwritten, pass a new '
                          'directory')
  partial = out.rstrip('/') + '.partial'
  if os.path.exists(partial):
    shutil.rmtree(partial)  # a previous write that died half-way
  os.makedirs(partial)
  if fmt == KAGGLE:
    host = jax.tree.map(lambda p: np.asarray(jax.device_get(p)), params)
    kaggle.save(jax.tree.map(lambda p: p.astype(dtype), host) if dtype else host,
                os.path.join(partial, name))
  elif fmt == HF:
    hf.save(params, cfg, partial, dtype or 'bfloat16')
  elif fmt == PEFT:
    peft.save(params, cfg, partial, dtype=dtype or 'float32', **lora)
  else:
    raise ValueError(f'cannot write format {fmt!r}; use one of {KAGGLE}, {HF}, {PEFT}')
  shutil.copyfile(tokenizer, os.path.join(partial, hf.TOKENIZER))
  if fmt == HF:
    hf.write_json(os.path.join(partial, hf.TOKENIZER_CONFIG), hf.tokenizer_config_json())
  if manifest:
    with open(os.path.join(partial, manifest[0]), 'w', encoding='utf-8') as f:
      json.dump(manifest[1], f, indent=2)
  os.replace(partial, out)  # OUT appears complete or not at all
  return os.path.join(out, name) if fmt == KAGGLE else out
