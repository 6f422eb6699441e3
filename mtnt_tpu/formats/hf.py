"""Hugging Face checkpoints: config.json plus safetensors, read lazily and written.

    DIR/config.json                      the architecture (GemmaForCausalLM,
                                         Gemma2ForCausalLM or Gemma3ForCausalLM)
    DIR/model.safetensors                or sharded:
    DIR/model-0000N-of-0000M.safetensors + model.safetensors.index.json
    DIR/tokenizer.model                  SentencePiece (read when config.tokenizer.path is empty)

Reading opens each file with `safetensors.safe_open` and takes only the slices
a device's shard covers (`get_slice`), under `jax.make_array_from_callback`:
no host reads a tensor whole unless its devices hold all of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator

import flax
from gemma import modules as gemma_modules
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from mtnt_tpu import model as model_lib
from mtnt_tpu.formats import arch as arch_lib
from mtnt_tpu.formats import layout

CONFIG = 'config.json'
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
GENERATION_CONFIG = 'generation_config.json'
TOKENIZER = 'tokenizer.model'
TOKENIZER_CONFIG = 'tokenizer_config.json'
# model_type and architecture per generation, as transformers names them.
MODEL_TYPES = {1: ('gemma', 'GemmaForCausalLM'), 2: ('gemma2', 'Gemma2ForCausalLM'),
               3: ('gemma3_text', 'Gemma3ForCausalLM')}
SHARD_BYTES = 4 << 30  # transformers' default max_shard_size is 5 GB; keep under it


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG))


def read_config(path: str) -> dict:
  try:
    with open(os.path.join(path, CONFIG), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}/{CONFIG} is not readable JSON ({e}); download it again') from e


def read_arch(path: str) -> arch_lib.Arch:
  """The network config.json describes."""
  c = read_config(path)
  generations = {model_type: gen for gen, (model_type, _) in MODEL_TYPES.items()}
  model_type = c.get('model_type')
  if model_type not in generations:
    extra = (' (a multimodal Gemma 3; use a text-only Gemma3ForCausalLM checkpoint)'
             if model_type == 'gemma3' else '')
    raise ValueError(f'{path}/{CONFIG} has model_type={model_type!r}{extra}; mtnt_tpu reads '
                     f'{", ".join(repr(t) for t in generations)}')
  try:
    heads = c['num_attention_heads']
    return arch_lib.Arch(
        generation=generations[model_type], num_layers=c['num_hidden_layers'],
        embed_dim=c['hidden_size'], hidden_dim=c['intermediate_size'], num_heads=heads,
        num_kv_heads=c.get('num_key_value_heads', heads),
        head_dim=c.get('head_dim', c['hidden_size'] // heads), vocab_size=c['vocab_size'])
  except KeyError as e:
    raise ValueError(f'{path}/{CONFIG} lacks {e.args[0]!r}; it is not a transformers '
                     'Gemma config') from e


class SafetensorsSource:
  """The tensors of DIR's safetensors files (one, or sharded with an index)."""

  def __init__(self, path: str):
    self.where = path
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      try:
        with open(index, encoding='utf-8') as f:
          files = json.load(f)['weight_map']
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f'{index} is not a safetensors index ({e}); download it again') from e
    elif os.path.isfile(os.path.join(path, SINGLE)):
      files = None
    else:
      raise ValueError(f'{path} holds {CONFIG} but neither {SINGLE} nor {INDEX}; '
                       'download the safetensors weights too')
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    for name in sorted(set(files.values()) if files else {SINGLE}):
      self._handles[name] = self._open(os.path.join(path, name))
    if files is None:
      files = {k: SINGLE for k in self._handles[SINGLE].keys()}
    self._file_of = files

  def _open(self, file: str):
    try:
      return self._stack.enter_context(safetensors.safe_open(file, framework='numpy'))
    except FileNotFoundError as e:
      raise ValueError(f'{file} is missing (named by {INDEX}); download it again') from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
      raise ValueError(f'{file} is truncated or not a safetensors file ({e}); '
                       'download it again') from e

  def close(self) -> None:
    self._stack.close()

  def shape(self, name: str) -> tuple[int, ...] | None:
    file = self._file_of.get(name)
    if file is None or name not in self._handles[file].keys():
      return None
    return tuple(self._handles[file].get_slice(name).get_shape())

  def read(self, role: str, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    del role  # Hugging Face keeps gemma's own norm weights
    return self._handles[self._file_of[name]].get_slice(name)[slices]


def load(path: str, target: Any, cfg: model_lib.TransformerConfig, variant: str) -> Any:
  """DIR's weights in `target`'s shapes, dtypes and shardings; checked before reading."""
  arch_lib.check(read_arch(path), cfg, variant, f'{path}/{CONFIG}')
  source = SafetensorsSource(path)
  try:
    layout.check_tensors(source, cfg, layout.HF, variant)
    return layout.assemble(source, cfg, layout.HF, target)
  finally:
    source.close()


# --- writing -----------------------------------------------------------------


def config_json(cfg: model_lib.TransformerConfig, dtype: str) -> dict:
  """config.json with the keys transformers' Gemma, Gemma2 and Gemma3 text configs read."""
  gen = layout.generation(cfg)
  model_type, architecture = MODEL_TYPES[gen]
  c = {
      'architectures': [architecture], 'model_type': model_type,
      'vocab_size': cfg.num_embed, 'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.hidden_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'hidden_activation': 'gelu_pytorch_tanh',
      'hidden_act': 'gelu_pytorch_tanh', 'max_position_embeddings': 8192 if gen < 3 else 32768,
      'rms_norm_eps': 1e-6, 'rope_theta': float(cfg.global_base_frequency),
      'attention_bias': False, 'attention_dropout': 0.0, 'initializer_range': 0.02,
      'tie_word_embeddings': True, 'use_cache': True,
      'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2, 'torch_dtype': dtype,
  }
  if gen >= 2:
    # transformers scales queries by query_pre_attn_scalar ** -0.5; gemma
    # multiplies them by cfg.query_pre_attn_scalar(). An int, as in Google's
    # configs: transformers 5 rejects 256.0.
    c['query_pre_attn_scalar'] = round(cfg.query_pre_attn_scalar() ** -2)
    c['sliding_window'] = cfg.sliding_window_size
    c['final_logit_softcapping'] = cfg.final_logit_softcap
    c['attn_logit_softcapping'] = cfg.attn_logits_soft_cap
    c['layer_types'] = ['sliding_attention' if t == gemma_modules.AttentionType.LOCAL_SLIDING else 'full_attention'
                        for t in cfg.attention_types]
    c['cache_implementation'] = 'hybrid'
  if gen == 3:
    c['rope_local_base_freq'] = float(cfg.local_base_frequency)
    c['rope_scaling'] = None
  return c


def generation_config_json() -> dict:
  return {'bos_token_id': 2, 'eos_token_id': [1, 106], 'pad_token_id': 0,
          'do_sample': False, 'cache_implementation': 'hybrid'}


def tokenizer_config_json() -> dict:
  """What AutoTokenizer needs beside tokenizer.model: without it transformers
  guesses the class from config.json and adds no BOS, which Gemma needs."""
  return {'tokenizer_class': 'GemmaTokenizer', 'add_bos_token': True, 'add_eos_token': False,
          'bos_token': '<bos>', 'eos_token': '<eos>', 'pad_token': '<pad>',
          'unk_token': '<unk>', 'padding_side': 'left'}


def tensors(params: Any, cfg: model_lib.TransformerConfig, dtype: str
            ) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, host array) for every tensor, one parameter at a time."""
  table = layout.NAMES[layout.generation(cfg)]
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for path, rule in layout.rules(cfg).items():
    whole = np.asarray(jax.device_get(flat[path])).astype(dtype)
    yield from zip(rule.names(table, layout.HF), rule.to_sources(whole))


def save(params: Any, cfg: model_lib.TransformerConfig, out: str, dtype: str = 'bfloat16',
         shard_bytes: int = SHARD_BYTES) -> None:
  """Writes config.json, generation_config.json and the safetensors into `out` (exists)."""
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  shapes = list(layout.sources(cfg, layout.HF))
  shards: list[list[str]] = [[]]
  size = 0
  for _, name, shape in shapes:
    n = math.prod(shape) * itemsize
    if shards[-1] and size + n > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  files = ([SINGLE] if len(shards) == 1 else
           [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))])
  file_of = {name: f for f, names in zip(files, shards) for name in names}
  pending: dict[str, dict[str, np.ndarray]] = {f: {} for f in files}
  for name, array in tensors(params, cfg, jnp.dtype(dtype)):
    f = file_of[name]
    pending[f][name] = array
    if len(pending[f]) == len(shards[files.index(f)]):  # complete: write and let go
      safetensors_numpy.save_file(pending.pop(f), os.path.join(out, f),
                                  metadata={'format': 'pt'})
  if len(files) > 1:
    total = sum(math.prod(shape) * itemsize for _, _, shape in shapes)
    write_json(os.path.join(out, INDEX),
               {'metadata': {'total_size': total}, 'weight_map': file_of})
  write_json(os.path.join(out, CONFIG), config_json(cfg, dtype))
  write_json(os.path.join(out, GENERATION_CONFIG), generation_config_json())


def write_json(path: str, value: dict) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
    f.write('\n')

