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
from mtnt_tpu.data import noise
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


class _ReadWindow(grain.transforms.Map):
  """A window of (record index, stream place) -> its examples as dicts of unpadded
  [n] arrays, the sources noised at config.data.noise (kinds at `noise_kinds`).

  The window's records come from one ArrayRecord read (a call per record cost
  about ten times as much). Pickles by paths, for Grain's worker processes.
  """

  def __init__(self, paths: list[str], tokenizer_path: str, dst_lang: str, max_len: int,
               chat_template: bool = False, noise_rate: float = 0.0, noise_seed: int = 0,
               noise_kinds: noise.Noise = noise.Noise()):
    self._paths, self._path, self._dst_lang = paths, tokenizer_path, dst_lang
    self._max_len, self._chat_template = max_len, chat_template
    self._noise_rate, self._noise_seed = noise_rate, noise_seed
    self._noise_kinds = noise_kinds
    self._tok = self._source = None

  def __getstate__(self):
    return {**self.__dict__, '_tok': None, '_source': None}

  def map(self, element):
    if self._tok is None:
      self._tok = tokenizer_lib.Tokenizer(self._path)
      self._source = grain.sources.ArrayRecordDataSource(self._paths)
    indices = [int(i) for i, _ in element]
    out = []
    for (index, place), record in zip(element, self._source.__getitems__(indices)):
      if self._noise_rate:
        record = noise.noisy_record(record, self._noise_rate, self._noise_seed, int(place),
                                    self._noise_kinds)
      ex = tokenize_example(self._tok, index, record, self._dst_lang, self._max_len,
                            self._chat_template)
      out.append({'inputs': ex.inputs, 'targets': ex.targets, 'mask': ex.mask,
                  'index': ex.index, 'truncated': ex.truncated})
    return out


def _empty_rows(num_rows: int, max_len: int) -> dict[str, np.ndarray]:
  """Padding rows [R, L]: zeros, and index -1."""
  rows = {k: np.zeros((num_rows, max_len), np.int32) for k in MODEL_KEYS}
  rows['index'] = np.full((num_rows, max_len), -1, np.int32)
  return rows


def _place(rows: dict, r: int, start: int, ex: dict, segment: int) -> int:
  """Writes example `ex` into row r from token `start`; returns where it ends."""
  end = start + len(ex['inputs'])
  for k in ('inputs', 'targets', 'mask', 'index'):
    rows[k][r, start:end] = ex[k]
  rows['positions'][r, start:end] = np.arange(end - start)
  rows['segment_ids'][r, start:end] = segment
  return end


def _pad_row(ex: dict, max_len: int) -> dict:
  """One example per row, padded to max_len (config.data.packing=False)."""
  row = _empty_rows(1, max_len)
  _place(row, 0, 0, ex, 1)
  return {k: v[0] for k, v in row.items()}


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


# Examples packed together: first-fit decreasing over a window of this many
# shuffled examples, each window read from ArrayRecord in one call. A larger
# window packs tighter (0.958 non-pad at 128 tokens on Multi30k, against 0.927
# to 0.941 for Grain's streaming BestFitPackIterDataset at 32 to 1024 bins, at
# 1.6x its examples per CPU-second: BENCHMARKS.md) and costs one window's
# tokenization before the first batch.
PACK_WINDOW = 1024


def pack_rows(examples: list[dict], max_len: int) -> list[dict]:
  """First-fit decreasing: unpadded examples -> rows of exactly max_len tokens.

  Each row carries segment ids 1, 2, ... per example (0 = padding) and
  per-example positions, so attention and RoPE never cross examples.
  """
  order = sorted(range(len(examples)), key=lambda i: -len(examples[i]['inputs']))
  free = np.full(len(examples), max_len, np.int64)  # free tokens per open row
  rows: list[list[int]] = []
  for i in order:
    n = len(examples[i]['inputs'])
    fits = np.nonzero(free[:len(rows)] >= n)[0]
    r = int(fits[0]) if len(fits) else len(rows)
    if r == len(rows):
      rows.append([])
    rows[r].append(i)
    free[r] -= n
  # Rows in order of their first example in the window, so the stream keeps
  # the shuffle's order as far as packing allows.
  rows.sort(key=min)
  out = _empty_rows(len(rows), max_len)
  for r, members in enumerate(rows):
    start = 0
    for segment, i in enumerate(sorted(members), 1):
      start = _place(out, r, start, examples[i], segment)
  return [{k: v[r] for k, v in out.items()} for r in range(len(rows))]


class _PackWindow(grain.experimental.FlatMapTransform):
  """A window of tokenized examples -> its packed (or padded) rows."""

  def __init__(self, max_len: int, packing: bool, drop_overlong: bool, window: int):
    self.max_len, self.packing, self.drop_overlong = max_len, packing, drop_overlong
    self.max_fan_out = window  # at worst one example per row

  def flat_map(self, window):
    examples = [ex for ex in window if not (self.drop_overlong and ex['truncated'])]
    if self.packing:
      return pack_rows(examples, self.max_len)
    return [_pad_row(ex, self.max_len) for ex in examples]


def check_overlong(overlong: str) -> None:
  if overlong not in ('truncate', 'drop'):
    raise ValueError(f"config.data.overlong={overlong!r}: use 'truncate' or 'drop'")


def _shard_stream(data_cfg, tokenizer_path: str, rows: int, k: int,
                  num_shards: int, chat_template: bool = False) -> grain.IterDataset:
  """Data shard k of K: its records, shuffled per epoch, packed into `rows` rows."""
  L = data_cfg.max_len
  check_overlong(data_cfg.overlong)
  seed = (data_cfg.shuffle_seed * 1_000_003 + k) % 2**32
  paths = split_paths(data_cfg.dir, data_cfg.train_split)
  n = len(grain.sources.ArrayRecordDataSource(paths))
  # Record indices, shuffled per epoch, in windows of consecutive shuffled
  # examples (a window may span two epochs); each window is read in one call.
  ds = grain.MapDataset.range(n)[k::num_shards]
  ds = ds.shuffle(seed=seed).repeat(None)
  # (record, place in this shard's endless stream): noise drawn from the place
  # differs per epoch and repeats exactly on resume.
  ds = ds.map_with_index(lambda place, record: (record, place))
  ds = ds.batch(PACK_WINDOW, batch_fn=list)
  ds = ds.map(_ReadWindow(paths, tokenizer_path, data_cfg.dst_lang, L, chat_template,
                          noise_rate=data_cfg.noise, noise_seed=seed,
                          noise_kinds=noise.from_rates(data_cfg.noise_rates)))
  # One thread builds the next window while this one is consumed; Grain's
  # default read-ahead (16 threads, 500 elements) would tokenize half a
  # million examples ahead.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  it = grain.experimental.FlatMapIterDataset(
      it, _PackWindow(L, data_cfg.packing, data_cfg.overlong == 'drop', PACK_WINDOW))
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
  """The whole eval split, truncated never dropped, packed as training packs it.

  With config.data.packing, each process packs its examples (every
  `count`-th, from its index) into full rows, first-fit decreasing over all of
  them; without, one example per row. Every process yields the same number of
  batches (padding rows have mask 0), so the global arrays line up across
  hosts whatever the split size: each process packs every host's share to
  count them (the eval split is small; no collective needed).
  """
  src = source(data_cfg.dir, data_cfg.eval_split)
  L = data_cfg.max_len
  examples = [dataclasses.asdict(tokenize_example(tok, i, src[i], data_cfg.dst_lang, L,
                                                  chat_template))
              for i in range(len(src))]
  rows_of = lambda host: (pack_rows(examples[host::shard.count], L) if data_cfg.packing
                          else [_pad_row(ex, L) for ex in examples[host::shard.count]])
  rows = rows_of(shard.index)
  most = max([len(rows)] + [len(rows_of(h)) for h in range(shard.count) if h != shard.index])
  num_batches = -(-most // local_batch)
  empty = {k: np.zeros(L, np.int32) for k in MODEL_KEYS} | {'index': np.full(L, -1, np.int32)}
  rows += [empty] * (num_batches * local_batch - len(rows))
  for b in range(num_batches):
    chunk = rows[b * local_batch:(b + 1) * local_batch]
    yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


@dataclasses.dataclass(frozen=True)
class LengthReport:
  """How the split's examples fit rows of max_len tokens (from a scan)."""
  scanned: int
  total: int
  overlong: int  # longer than max_len: truncated or dropped, by config.data.overlong
  mean_tokens: float
  max_tokens: int

  def describe(self, max_len: int, overlong: str) -> str:
    sample = '' if self.scanned == self.total else f' (first {self.scanned} scanned)'
    return (f'{self.total} train examples{sample}: mean {self.mean_tokens:.1f} tokens, '
            f'max {self.max_tokens}; {self.overlong} ({100 * self.overlong / self.scanned:.2f}%) '
            f'exceed max_len={max_len} and are {overlong}d')


def length_report(data_cfg, tok: tokenizer_lib.Tokenizer, chat_template: bool = False,
                  limit: int = 100_000) -> LengthReport:
  """Tokenizes up to `limit` train examples, so a run says up front what it
  truncates or drops instead of doing it silently."""
  src = source(data_cfg.dir, data_cfg.train_split)
  n = min(len(src), limit)
  lengths = np.empty(n, np.int64)
  for i in range(n):
    pair = records.decode(src[i])
    prompt, target = tok.encode_example(pair.src, pair.dst, data_cfg.dst_lang, chat_template)
    lengths[i] = len(prompt) + len(target) - 1  # tokens the example occupies in a row
  return LengthReport(scanned=n, total=len(src), overlong=int(np.sum(lengths > data_cfg.max_len)),
                      mean_tokens=float(lengths.mean()), max_tokens=int(lengths.max()))


def to_global(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This host's rows -> global arrays [global_batch, L] for the model keys."""
  return {k: jax.make_array_from_process_local_data(sharding, local_batch[k])
          for k in MODEL_KEYS}
