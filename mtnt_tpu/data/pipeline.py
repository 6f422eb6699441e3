"""ArrayRecord -> Grain -> packed rows -> global `jax.Array` batches.

Each JAX process reads its own slice of the split, tokenizes (in Grain worker
processes when config.data.num_workers > 0), packs several examples into each
row of `max_len` tokens and batches its share of the global batch; the trainer
only ever sees global arrays. The Grain iterator's state is what makes resume
exact: it is saved with every checkpoint (see checkpoint.py).

A row holds, each [B, L]:
  inputs       token ids fed to the model
  targets      the next token for each input (inputs shifted within its example)
  mask         1 where the loss counts: target tokens (translation and EOS)
  positions    position within its own example (RoPE restarts per example)
  segment_ids  1, 2, ... per example in the row; 0 marks padding
and, host-side only, `index`: the record index each token came from (-1 pad).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterator

import grain
import jax
import numpy as np

from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu.data import records

MODEL_KEYS = ('inputs', 'targets', 'mask', 'positions', 'segment_ids')


def split_paths(data_dir: str, split: str) -> list[str]:
  """`split.array_record` or its shards `split.array_record-0000N-of-0000M`."""
  paths = sorted(glob.glob(os.path.join(data_dir, f'{split}.array_record')) +
                 glob.glob(os.path.join(data_dir, f'{split}.array_record-*-of-*')))
  if not paths:
    raise FileNotFoundError(
        f'no {split}.array_record in config.data.dir={data_dir!r}; write it with '
        '`python -m mtnt_tpu.prepare ... --out DIR` and set config.data.dir=DIR')
  return paths


def source(data_dir: str, split: str) -> grain.MapDataset:
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(split_paths(data_dir, split)))


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized pair, unpadded; len(inputs) == len(targets) == len(mask)."""
  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray
  index: np.ndarray
  truncated: bool


def tokenize_example(tok: tokenizer_lib.Tokenizer, index: int, record: bytes,
                     dst_lang: str, max_len: int, chat_template: bool = False) -> Example:
  pair = records.decode(record)
  prompt, target = tok.encode_example(pair.src, pair.dst, dst_lang, chat_template)
  full = np.asarray(prompt + target, np.int32)
  # Position i predicts full[i + 1]: the loss counts from the last prompt
  # token (predicting the first target token) to the token before EOS.
  mask = np.zeros(len(full) - 1, np.int32)
  mask[len(prompt) - 1:] = 1
  n = len(full) - 1
  truncated = n > max_len
  n = min(n, max_len)
  return Example(inputs=full[:n], targets=full[1:n + 1], mask=mask[:n],
                 index=np.full(n, index, np.int32), truncated=truncated)


class _Tokenize(grain.transforms.Map):
  """(index, record) -> dict of unpadded [n] arrays. Pickles by tokenizer path."""

  def __init__(self, tokenizer_path: str, dst_lang: str, max_len: int,
               chat_template: bool = False):
    self._path, self._dst_lang, self._max_len = tokenizer_path, dst_lang, max_len
    self._chat_template = chat_template
    self._tok = None

  def __getstate__(self):
    return {**self.__dict__, '_tok': None}

  def map(self, element):
    if self._tok is None:
      self._tok = tokenizer_lib.Tokenizer(self._path)
    index, record = element
    ex = tokenize_example(self._tok, index, record, self._dst_lang, self._max_len,
                          self._chat_template)
    return {'inputs': ex.inputs, 'targets': ex.targets, 'mask': ex.mask,
            'index': ex.index, 'truncated': np.asarray(ex.truncated)}


def _pad_row(ex: dict, max_len: int) -> dict:
  """One example per row, padded: the seed tutorial's layout, kept for comparison."""
  n = len(ex['inputs'])
  pad = lambda x, v=0: np.pad(x, (0, max_len - n), constant_values=v)
  return {'inputs': pad(ex['inputs']), 'targets': pad(ex['targets']), 'mask': pad(ex['mask']),
          'positions': pad(np.arange(n, dtype=np.int32)),
          'segment_ids': pad(np.ones(n, np.int32)), 'index': pad(ex['index'], -1)}


def _from_packed(row: dict) -> dict:
  seg = row['inputs_segment_ids']
  return {'inputs': row['inputs'], 'targets': row['targets'], 'mask': row['mask'],
          'positions': row['inputs_positions'], 'segment_ids': seg,
          'index': np.where(seg > 0, row['index'], -1).astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which slice of the global batch this process feeds."""
  index: int
  count: int

  @classmethod
  def current(cls) -> 'HostShard':
    return cls(jax.process_index(), jax.process_count())


def num_data_shards(data_cfg, shard: HostShard) -> int:
  """Data shards K: config.data.num_shards, or one per process when 0."""
  k = data_cfg.num_shards or shard.count
  if k % shard.count:
    raise ValueError(f'config.data.num_shards={k} must be a multiple of the '
                     f'{shard.count} processes')
  return k


def _shard_stream(data_cfg, tokenizer_path: str, rows: int, k: int,
                  num_shards: int, chat_template: bool = False) -> grain.IterDataset:
  """Data shard k of K: its records, shuffled per epoch, packed into `rows` rows."""
  L = data_cfg.max_len
  seed = (data_cfg.shuffle_seed * 1_000_003 + k) % 2**32
  ds = source(data_cfg.dir, data_cfg.train_split)
  n = len(ds)
  # Grain passes later epochs' indices unreduced (epoch * n + i).
  ds = ds.map_with_index(lambda i, r: (i % n, r))
  ds = ds[k::num_shards]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_Tokenize(tokenizer_path, data_cfg.dst_lang, L, chat_template))
  if data_cfg.overlong == 'drop':
    ds = ds.filter(lambda ex: not ex['truncated'])
  elif data_cfg.overlong != 'truncate':
    raise ValueError(f"config.data.overlong={data_cfg.overlong!r}: use 'truncate' or 'drop'")
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != 'truncated'})
  # A short read-ahead: Grain's default (500 elements, 16 threads) costs more
  # in bookkeeping than tokenizing a sentence does.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  if data_cfg.packing:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: L for k in ('inputs', 'targets', 'mask', 'index')},
        num_packing_bins=rows, seed=seed, meta_features=('targets', 'mask', 'index'))
    it = it.map(_from_packed)
  else:
    it = it.map(lambda ex: _pad_row(ex, L))
  return it.batch(rows, drop_remainder=True)


def train_dataset(data_cfg, tokenizer_path: str, batch_size: int,
                  shard: HostShard, chat_template: bool = False) -> grain.IterDataset:
  """This process's rows of each global batch: infinite, shuffled per epoch.

  The split is cut into K data shards (config.data.num_shards), each a stream
  of packed rows; a global batch is shard 0's rows, then shard 1's, and so on,
  and each process makes the rows of its K/P shards. The batches are therefore
  the same whatever the number of processes P, as long as it divides K: a run
  can resume, or be checked, on another host count.
  """
  num_shards = num_data_shards(data_cfg, shard)
  if batch_size % num_shards:
    raise ValueError(f'config.train.batch_size={batch_size} must be a multiple of '
                     f'config.data.num_shards={num_shards}')
  rows = batch_size // num_shards
  per_host = num_shards // shard.count
  mine = range(shard.index * per_host, (shard.index + 1) * per_host)
  streams = [_shard_stream(data_cfg, tokenizer_path, rows, k, num_shards, chat_template)
             for k in mine]
  if len(streams) == 1:
    it = streams[0]
  else:
    it = grain.experimental.ZipIterDataset(streams).map(
        lambda parts: {key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
  if data_cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  else:  # batches are made in a thread while the device runs the step
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)
  return it


def eval_batches(data_cfg, tok: tokenizer_lib.Tokenizer, local_batch: int,
                 shard: HostShard, chat_template: bool = False) -> Iterator[dict]:
  """The whole eval split, one example per row, truncated never dropped.

  Every process yields the same number of batches (padding rows have mask 0),
  so the global arrays line up across hosts whatever the split size.
  """
  src = source(data_cfg.dir, data_cfg.eval_split)
  n = len(src)
  per_host = -(-n // shard.count)
  num_batches = -(-per_host // local_batch)
  mine = list(range(shard.index, n, shard.count))
  L = data_cfg.max_len
  empty = {k: np.zeros(L, np.int32) for k in MODEL_KEYS} | {'index': np.full(L, -1, np.int32)}
  rows = []
  for i in mine:
    ex = tokenize_example(tok, i, src[i], data_cfg.dst_lang, L, chat_template)
    rows.append(_pad_row(dataclasses.asdict(ex), L))
  rows += [empty] * (num_batches * local_batch - len(rows))
  for b in range(num_batches):
    chunk = rows[b * local_batch:(b + 1) * local_batch]
    yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


def to_global(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This host's rows -> global arrays [global_batch, L] for the model keys."""
  return {k: jax.make_array_from_process_local_data(sharding, local_batch[k])
          for k in MODEL_KEYS}
