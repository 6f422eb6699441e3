"""GGUF files (llama.cpp's format): quantised Gemma weights and their tokenizer.

What differs from Hugging Face, and is undone here:
  - tensors may be quantised (Q4_K, Q5_0, Q8_0, ...): `gguf.quants.dequantize`
    turns the rows a shard needs into float32;
  - GGUF lists shapes innermost first; its rows are Hugging Face's rows;
  - every Gemma norm weight is stored as (1 + w), gemma keeps w;
  - the embedding is tied (no output head), as in gemma;
  - the tokenizer is metadata (pieces, scores, types), not a SentencePiece
    file: `tokenizer_model` rebuilds one.

The `gguf` package is imported only here, only when a .gguf is loaded
(`uv sync --extra real`, or `pip install gguf`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from typing import Any

import numpy as np

from mtnt_tpu import model as model_lib
from mtnt_tpu.formats import arch as arch_lib
from mtnt_tpu.formats import layout

GENERATIONS = {'gemma': 1, 'gemma2': 2, 'gemma3': 3}  # general.architecture


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('reading a .gguf checkpoint needs the gguf package: '
                     '`uv sync --extra real` (or `pip install gguf`)') from e
  return gguf


def open_reader(path: str):
  """A GGUFReader over `path` (memory-mapped); one line if bad.

  Parsing a 262k-piece vocabulary's metadata takes seconds, so the tokenizer
  and the weights share one reader per file version.
  """
  if not os.path.isfile(path):
    raise ValueError(f'config.model.checkpoint={path!r} is not a file')
  stat = os.stat(path)
  return _reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
  del size, mtime_ns  # the cache key: a rewritten file is read again
  gguf = _gguf()
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, OSError, KeyError) as e:
    raise ValueError(f'{path} is truncated or not a GGUF file ({type(e).__name__}: {e}); '
                     'copy or assemble it again') from e


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def read_arch(reader, path: str) -> arch_lib.Arch:
  """The network the GGUF's metadata describes."""
  name = _field(reader, 'general.architecture')
  if name not in GENERATIONS:
    raise ValueError(f'{path} holds a {name!r} model; mtnt_tpu reads the GGUF architectures '
                     f'{", ".join(repr(g) for g in GENERATIONS)}')
  need = lambda key: _required(reader, path, f'{name}.{key}')
  heads, width = int(need('attention.head_count')), int(need('embedding_length'))
  tokens = reader.fields.get('tokenizer.ggml.tokens')
  return arch_lib.Arch(
      generation=GENERATIONS[name], num_layers=int(need('block_count')), embed_dim=width,
      hidden_dim=int(need('feed_forward_length')), num_heads=heads,
      num_kv_heads=int(_field(reader, f'{name}.attention.head_count_kv', heads)),
      head_dim=int(_field(reader, f'{name}.attention.key_length', width // heads)),
      vocab_size=len(tokens.data) if tokens is not None else -1)


def _required(reader, path: str, key: str) -> Any:
  value = _field(reader, key)
  if value is None:
    raise ValueError(f'{path} lacks the metadata key {key}; it is not a complete Gemma GGUF')
  return value


class GGUFSource:
  """The tensors of a GGUF file, dequantised row range by row range."""

  def __init__(self, reader, path: str):
    self.where = path
    self._tensors = {t.name: t for t in reader.tensors}
    self._dequantize = _gguf().quants.dequantize

  def shape(self, name: str) -> tuple[int, ...] | None:
    t = self._tensors.get(name)
    return None if t is None else tuple(int(n) for n in reversed(t.shape.tolist()))

  def read(self, role: str, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    t = self._tensors[name]
    # Quantised rows are whole blocks: dequantise the rows asked for, then cut.
    rows = self._dequantize(np.asarray(t.data[slices[0]]), t.tensor_type)
    rows = rows.reshape(-1, *self.shape(name)[1:])[(slice(None), *slices[1:])]
    rows = rows.astype(np.float32)
    return rows - 1 if layout.is_norm(role) else rows


def load(path: str, target: Any, cfg: model_lib.TransformerConfig, variant: str) -> Any:
  """The GGUF's weights in `target`'s shapes, dtypes and shardings."""
  reader = open_reader(path)
  arch_lib.check(read_arch(reader, path), cfg, variant, path)
  source = GGUFSource(reader, path)
  layout.check_tensors(source, cfg, layout.GGUF, variant)
  return layout.assemble(source, cfg, layout.GGUF, target)


# --- the tokenizer -------------------------------------------------------------


# SentencePiece's ModelProto, written by hand: the field numbers of
# sentencepiece_model.proto that a Gemma vocabulary sets. (sentencepiece's own
# generated module needs a newer protobuf than the one this project resolves.)
_PIECE = {'piece': 1, 'score': 2, 'type': 3}
_TRAINER = {'model_type': 3, 'vocab_size': 4, 'split_digits': 25,
            'allow_whitespace_only_pieces': 26, 'byte_fallback': 35, 'unk_id': 40,
            'bos_id': 41, 'eos_id': 42, 'pad_id': 43, 'unk_piece': 45, 'bos_piece': 46,
            'eos_piece': 47, 'pad_piece': 48}
_NORMALIZER = {'name': 1, 'add_dummy_prefix': 3, 'remove_extra_whitespaces': 4,
               'escape_whitespaces': 5}
_MODEL = {'pieces': 1, 'trainer_spec': 2, 'normalizer_spec': 3}
BPE = 2  # TrainerSpec.ModelType
_UNKNOWN, _CONTROL, _USER_DEFINED, BYTE = 2, 3, 4, 6  # SentencePiece.Type, as GGUF's


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int32s are ten bytes, as protobuf writes them
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _message(numbers: dict[str, int], **fields) -> bytes:
  """Fields in protobuf's wire format: str/bytes/float/int/bool by Python type."""
  out = bytearray()
  for name, value in fields.items():
    key = numbers[name] << 3
    if isinstance(value, str):
      value = value.encode('utf-8')
    if isinstance(value, bytes):
      out += _varint(key | 2) + _varint(len(value)) + value
    elif isinstance(value, float):
      out += _varint(key | 5) + struct.pack('<f', value)
    else:  # int, bool, enum
      out += _varint(key) + _varint(int(value))
  return bytes(out)


def tokenizer_model(path: str) -> bytes:
  """A serialized SentencePiece ModelProto rebuilt from the GGUF's metadata.

  Gemma's tokenizer is SentencePiece BPE with byte fallback, no dummy prefix
  and no whitespace normalisation; GGUF keeps its pieces, scores and piece
  types (numbered as SentencePiece numbers them) and its special ids.
  """
  reader = open_reader(path)
  kind = _field(reader, 'tokenizer.ggml.model')
  if kind != 'llama':
    raise ValueError(f"{path} has tokenizer.ggml.model={kind!r}; only SentencePiece ('llama') "
                     'vocabularies can be rebuilt')
  pieces = _required(reader, path, 'tokenizer.ggml.tokens')
  scores = _required(reader, path, 'tokenizer.ggml.scores')
  types = [int(t) for t in _required(reader, path, 'tokenizer.ggml.token_type')]
  ids = {name: int(_field(reader, f'tokenizer.ggml.{key}', default))
         for name, key, default in (('unk_id', 'unknown_token_id', 3), ('bos_id', 'bos_token_id', 2),
                                    ('eos_id', 'eos_token_id', 1),
                                    ('pad_id', 'padding_token_id', 0))}
  # llama.cpp marks every special token CONTROL (never produced by encoding
  # text); Gemma's own SentencePiece model has only pad, eos and bos so, unk
  # UNKNOWN, and the rest (<start_of_turn>, <end_of_turn>, ...) USER_DEFINED,
  # so that a prompt's `<start_of_turn>` encodes to one token.
  types = [_USER_DEFINED if t == _CONTROL and i not in ids.values() else t
           for i, t in enumerate(types)]
  types[ids['unk_id']] = _UNKNOWN
  trainer = _message(
      _TRAINER, model_type=BPE, vocab_size=len(pieces), split_digits=True,
      allow_whitespace_only_pieces=True, byte_fallback=BYTE in types, **ids,
      **{name.replace('_id', '_piece'): pieces[i] for name, i in ids.items()})
  normalizer = _message(
      _NORMALIZER, name='identity',
      add_dummy_prefix=bool(_field(reader, 'tokenizer.ggml.add_space_prefix', False)),
      remove_extra_whitespaces=False, escape_whitespaces=True)
  out = bytearray()
  for piece, score, kind in zip(pieces, scores, types):
    out += _message(_MODEL, pieces=_message(_PIECE, piece=piece, score=float(score), type=kind))
  out += _message(_MODEL, trainer_spec=trainer, normalizer_spec=normalizer)
  return bytes(out)


def write_tokenizer(path: str, cache_dir: str) -> str:
  """Rebuilds the GGUF's tokenizer into `cache_dir`, once per file version; returns its path."""
  stat = os.stat(path)
  key = f'{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode()
  stem = os.path.splitext(os.path.basename(path))[0]
  out = os.path.join(cache_dir, f'{stem}-{hashlib.sha256(key).hexdigest()[:12]}.model')
  if not os.path.isfile(out):
    model = tokenizer_model(path)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{out}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
      f.write(model)
    os.replace(tmp, out)
  return out
