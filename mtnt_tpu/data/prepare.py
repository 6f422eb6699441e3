"""Parallel text -> the project's ArrayRecord files (one per split) + stats.json.

Four input layouts become `records.Pair`s: the MTNT release, a TSV per split,
two line-aligned text files per split (Multi30k, WMT) and JSON lines. A bad line
is skipped and counted, never fatal: scraped text always has a few, and one must
not cost the whole file. A bad *request* (missing file, misaligned files, an
output dir that already holds data) stops everything before anything is written.

Library use (no flags involved):

  stats = prepare({'train': TsvSource('train.tsv'),
                   'valid': TsvSource('valid.tsv')}, '/tmp/out')

CLI: `python -m mtnt_tpu.prepare --helpshort`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import os
import re
import secrets
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, Protocol, Sequence

from absl import app
from absl import flags
from array_record.python import array_record_module

from mtnt_tpu.data import records

SPLITS = ('train', 'valid', 'test')
MTNT_PAIRS = ('en-fr', 'fr-en', 'en-ja', 'ja-en')
DEFAULT_MAX_CHARS = 2000
SAMPLE_SIZE = 5
STATS_FILE = 'stats.json'

_BOM = b'\xef\xbb\xbf'
_SPLIT_NAME = re.compile(r'[a-z0-9_]+')
# Records copied per read while sharding: bounds memory on WMT-sized inputs.
_SHARD_CHUNK = 8192


class PrepareError(ValueError):
  """A bad request (not a bad line): reported in one line, nothing written."""


class SkipReason(enum.StrEnum):
  WRONG_COLUMN_COUNT = 'wrong_column_count'
  EMPTY_SOURCE = 'empty_source'
  EMPTY_TARGET = 'empty_target'
  INVALID_UTF8 = 'invalid_utf8'
  FIELD_TOO_LONG = 'field_too_long'
  INVALID_JSON = 'invalid_json'
  MISSING_FIELD = 'missing_field'
  WRONG_FIELD_TYPE = 'wrong_field_type'
  # JSON can spell lone surrogates (\ud800) that no UTF-8 record can hold.
  INVALID_UNICODE = 'invalid_unicode'


class Note(enum.StrEnum):
  """Counted, never skipped: worth knowing about, not worth dropping a line."""

  CRLF_LINES = 'crlf_lines'
  EMPTY_ID = 'empty_id'  # an id column/field was there but blank: id generated


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: SkipReason
  path: str  # the file at fault: aligned inputs read two files per line


@dataclasses.dataclass(frozen=True)
class Parsed:
  """One input line, as a reader yields it."""

  line_no: int  # 1-based
  result: records.Pair | Skip
  notes: tuple[Note, ...] = ()


class Source(Protocol):
  """One split's input. Readers never raise on content, only on I/O."""

  @property
  def paths(self) -> tuple[str, ...]:
    ...

  def describe(self) -> str:
    ...

  def check(self) -> None:
    """Raises PrepareError when the input is unusable as a whole."""

  def read(self, split: str, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Parsed]:
    ...


# ---------------------------------------------------------------- line reading


@dataclasses.dataclass(frozen=True)
class _Line:
  no: int
  text: str | None  # None: not valid UTF-8
  crlf: bool


def _lines(path: str) -> Iterator[_Line]:
  # Bytes in, our own decode per line: a bad byte costs one line, not the file,
  # and only b'\n' ends a line (str.splitlines would also split on \x1c, \u2028).
  with open(path, 'rb') as f:
    for no, raw in enumerate(f, start=1):
      if no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
      if raw.endswith(b'\n'):
        raw = raw[:-1]
      crlf = raw.endswith(b'\r')
      if crlf:
        raw = raw[:-1]
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError:
        text = None
      yield _Line(no, text, crlf)


def count_lines(path: str) -> int:
  """Lines as `_lines` yields them: a last line without newline counts."""
  n, last = 0, b'\n'
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      n += chunk.count(b'\n')
      last = chunk[-1:]
  return n + (last != b'\n')


def _crlf_note(*lines: _Line) -> tuple[Note, ...]:
  return tuple(Note.CRLF_LINES for line in lines if line.crlf)


def _pair_or_skip(pair_id: str, src: str, dst: str, *, max_chars: int, src_path: str,
                  dst_path: str) -> records.Pair | Skip:
  src, dst = src.strip(), dst.strip()
  if not src:
    return Skip(SkipReason.EMPTY_SOURCE, src_path)
  if not dst:
    return Skip(SkipReason.EMPTY_TARGET, dst_path)
  if len(src) > max_chars or len(pair_id) > max_chars:
    return Skip(SkipReason.FIELD_TOO_LONG, src_path)
  if len(dst) > max_chars:
    return Skip(SkipReason.FIELD_TOO_LONG, dst_path)
  return records.Pair(pair_id, src, dst)


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise PrepareError(f'input file not found: {path}')
  if not os.path.isfile(path):
    raise PrepareError(f'input is not a regular file: {path}')
  if not os.access(path, os.R_OK):
    raise PrepareError(f'input file is not readable: {path}')


# --------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class TsvSource:
  """`source<TAB>target` or `id<TAB>source<TAB>target` rows.

  Double quotes are text, never CSV quoting: MTNT has `"` in comments, and a
  CSV reader would swallow the lines after an unbalanced one.
  """

  path: str
  columns: int | None = None  # 2 or 3; None: from the file's first good line

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,)

  def describe(self) -> str:
    return f'TSV {self.path}'

  def check(self) -> None:
    if self.columns not in (None, 2, 3):
      raise PrepareError(f'TSV columns must be 2 or 3, not {self.columns}')
    _check_file(self.path)

  def read(self, split: str, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Parsed]:
    columns = self.columns
    for line in _lines(self.path):
      notes = _crlf_note(line)
      if line.text is None:
        yield Parsed(line.no, Skip(SkipReason.INVALID_UTF8, self.path), notes)
        continue
      if not line.text.strip():
        yield Parsed(line.no, Skip(SkipReason.EMPTY_SOURCE, self.path), notes)
        continue
      fields = line.text.split('\t')
      if len(fields) not in ((columns,) if columns else (2, 3)):
        yield Parsed(line.no, Skip(SkipReason.WRONG_COLUMN_COUNT, self.path), notes)
        continue
      pair_id = fields[0].strip() if len(fields) == 3 else ''
      if not pair_id:
        if len(fields) == 3:
          notes += (Note.EMPTY_ID,)
        pair_id = f'{split}-{line.no}'
      result = _pair_or_skip(pair_id, fields[-2], fields[-1], max_chars=max_chars,
                             src_path=self.path, dst_path=self.path)
      if columns is None and isinstance(result, records.Pair):
        columns = len(fields)
      yield Parsed(line.no, result, notes)


@dataclasses.dataclass(frozen=True)
class AlignedSource:
  """Two line-aligned text files (Multi30k, WMT): line n of each is a pair."""

  src_path: str
  dst_path: str

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.src_path, self.dst_path)

  def describe(self) -> str:
    return f'aligned text {self.src_path} + {self.dst_path}'

  def check(self) -> None:
    _check_file(self.src_path)
    _check_file(self.dst_path)
    # A shifted line misaligns every pair after it, silently: refuse outright.
    n_src, n_dst = count_lines(self.src_path), count_lines(self.dst_path)
    if n_src != n_dst:
      raise PrepareError(
          f'line counts differ: {self.src_path} has {n_src} lines, {self.dst_path} has '
          f'{n_dst}; the two files must be line-aligned')

  def read(self, split: str, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Parsed]:
    for s, d in itertools.zip_longest(_lines(self.src_path), _lines(self.dst_path)):
      if s is None or d is None:
        raise PrepareError(f'{self.src_path} and {self.dst_path} changed line counts while '
                           'being read')
      notes = _crlf_note(s, d)
      if s.text is None:
        result = Skip(SkipReason.INVALID_UTF8, self.src_path)
      elif d.text is None:
        result = Skip(SkipReason.INVALID_UTF8, self.dst_path)
      else:
        result = _pair_or_skip(f'{split}-{s.no}', s.text, d.text, max_chars=max_chars,
                               src_path=self.src_path, dst_path=self.dst_path)
      yield Parsed(s.no, result, notes)


@dataclasses.dataclass(frozen=True)
class JsonlSource:
  """One JSON object per line; the id field is optional."""

  path: str
  src_field: str = 'src'
  dst_field: str = 'dst'
  id_field: str = 'id'

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,)

  def describe(self) -> str:
    return (f'JSON lines {self.path} (src={self.src_field!r}, dst={self.dst_field!r}, '
            f'id={self.id_field!r})')

  def check(self) -> None:
    _check_file(self.path)

  def read(self, split: str, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Parsed]:
    for line in _lines(self.path):
      yield Parsed(line.no, self._parse(line, split, max_chars), _crlf_note(line))

  def _parse(self, line: _Line, split: str, max_chars: int) -> records.Pair | Skip:
    if line.text is None:
      return Skip(SkipReason.INVALID_UTF8, self.path)
    if not line.text.strip():
      return Skip(SkipReason.EMPTY_SOURCE, self.path)
    try:
      obj = json.loads(line.text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested arrays
      return Skip(SkipReason.INVALID_JSON, self.path)
    if not isinstance(obj, dict):
      return Skip(SkipReason.INVALID_JSON, self.path)
    src, dst = obj.get(self.src_field), obj.get(self.dst_field)
    if src is None or dst is None:
      return Skip(SkipReason.MISSING_FIELD, self.path)
    if not isinstance(src, str) or not isinstance(dst, str):
      return Skip(SkipReason.WRONG_FIELD_TYPE, self.path)
    raw_id = obj.get(self.id_field)
    pair_id = ''
    if isinstance(raw_id, str):
      pair_id = raw_id.strip()
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
      pair_id = str(raw_id)
    result = _pair_or_skip(pair_id or f'{split}-{line.no}', src, dst, max_chars=max_chars,
                           src_path=self.path, dst_path=self.path)
    if isinstance(result, records.Pair):
      try:
        (result.id + result.src + result.dst).encode('utf-8')
      except UnicodeEncodeError:
        return Skip(SkipReason.INVALID_UNICODE, self.path)
    return result


def mtnt_sources(mtnt_dir: str, pair: str) -> dict[str, Source]:
  """The MTNT release layout: DIR/{split}/{split}.{pair}.tsv, 3 columns."""
  if pair not in MTNT_PAIRS:
    raise PrepareError(f'MTNT pair must be one of {", ".join(MTNT_PAIRS)}, not {pair!r}')
  return {
      split: TsvSource(os.path.join(mtnt_dir, split, f'{split}.{pair}.tsv'), columns=3)
      for split in SPLITS
  }


# ----------------------------------------------------------------------- stats


@dataclasses.dataclass(frozen=True)
class ReasonStats:
  count: int
  lines: tuple[int, ...]  # the first SAMPLE_SIZE line numbers, 1-based
  files: tuple[str, ...]  # the files these lines were in, first seen first


@dataclasses.dataclass(frozen=True)
class SplitStats:
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]  # file names inside out_dir, in record order
  lines_read: int
  records: int
  skipped: Mapping[str, ReasonStats]
  notes: Mapping[str, int]

  @property
  def lines_skipped(self) -> int:
    return sum(r.count for r in self.skipped.values())

  def to_json(self) -> dict[str, Any]:
    return {
        'inputs': list(self.inputs),
        'outputs': list(self.outputs),
        'lines_read': self.lines_read,
        'records': self.records,
        'lines_skipped': self.lines_skipped,
        'skipped': {k: {'count': v.count, 'lines': list(v.lines), 'files': list(v.files)}
                    for k, v in self.skipped.items()},
        'notes': dict(self.notes),
    }


@dataclasses.dataclass(frozen=True)
class Stats:
  input: str
  flags: Mapping[str, Any]
  splits: Mapping[str, SplitStats]

  def to_json(self) -> dict[str, Any]:
    return {
        'input': self.input,
        'flags': dict(self.flags),
        'splits': {k: v.to_json() for k, v in self.splits.items()},
    }


class _SplitCounter:
  """Mutable tally while a split streams; frozen into SplitStats at the end."""

  def __init__(self) -> None:
    self.lines_read = 0
    self.counts: dict[str, int] = {}
    self.lines: dict[str, list[int]] = {}
    self.files: dict[str, list[str]] = {}
    self.notes: dict[str, int] = {}

  def add(self, parsed: Parsed) -> None:
    self.lines_read += 1
    for note in parsed.notes:
      self.notes[note.value] = self.notes.get(note.value, 0) + 1
    if isinstance(parsed.result, Skip):
      reason = parsed.result.reason.value
      self.counts[reason] = self.counts.get(reason, 0) + 1
      lines = self.lines.setdefault(reason, [])
      if len(lines) < SAMPLE_SIZE:
        lines.append(parsed.line_no)
      files = self.files.setdefault(reason, [])
      path = os.path.abspath(parsed.result.path)  # like SplitStats.inputs
      if path not in files:
        files.append(path)

  def freeze(self, inputs: tuple[str, ...], outputs: tuple[str, ...],
             n_records: int) -> SplitStats:
    skipped = {r: ReasonStats(self.counts[r], tuple(self.lines[r]), tuple(self.files[r]))
               for r in sorted(self.counts)}
    return SplitStats(inputs, outputs, self.lines_read, n_records, skipped,
                      dict(sorted(self.notes.items())))


def _skipped_text(split: SplitStats) -> str:
  return ', '.join(f'{k} {v.count}' for k, v in split.skipped.items()) or 'none'


def format_summary(stats: Stats, out_dir: str, seconds: float | None = None) -> str:
  took = f' in {seconds:.1f}s' if seconds is not None else ''
  rows = [f'prepare: wrote {out_dir}{took}']
  for name, split in stats.splits.items():
    files = f' ({len(split.outputs)} files)' if len(split.outputs) > 1 else ''
    notes = ''.join(f', {k} {v}' for k, v in split.notes.items())
    rows.append(f'  {name:<6} {split.records:>9} records{files} from {split.lines_read} lines; '
                f'skipped: {_skipped_text(split)}{notes}')
  return '\n'.join(rows)


# --------------------------------------------------------------------- writing


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.islink(out_dir):
    raise PrepareError(f'output path is a symlink: {out_dir}; pass the real directory')
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise PrepareError(f'output path exists and is not a directory: {out_dir}')
  entries = os.listdir(out_dir)
  if not entries:
    return
  if not overwrite:
    raise PrepareError(f'output dir {out_dir} already holds {len(entries)} entries; pass '
                       '--overwrite to replace it or choose another --out_dir')
  # --overwrite deletes the old dir: only ever one that prepare wrote, so a
  # mistyped --out_dir (a home dir, a checkpoint dir) can't be wiped.
  if STATS_FILE not in entries:
    raise PrepareError(f'refusing to --overwrite {out_dir}: it has no {STATS_FILE}, so '
                       'prepare did not write it; delete or move it yourself')


def _write_split(split: str, source: Source, path: str, max_chars: int) -> tuple[_SplitCounter,
                                                                                  int]:
  counter = _SplitCounter()

  def good_pairs() -> Iterator[records.Pair]:
    for parsed in source.read(split, max_chars):
      counter.add(parsed)
      if isinstance(parsed.result, records.Pair):
        yield parsed.result

  return counter, records.write(path, good_pairs())


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}.array_record-{index:05d}-of-{count:05d}'


def _shard(path: str, split: str, n_records: int, n_shards: int) -> tuple[str, ...]:
  """Splits one record file into n_shards contiguous blocks, then removes it."""
  out_dir = os.path.dirname(path)
  names = tuple(shard_name(split, k, n_shards) for k in range(n_shards))
  bounds = [n_records * k // n_shards for k in range(n_shards + 1)]
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for name, begin, end in zip(names, bounds, bounds[1:]):

      def block(begin: int = begin, end: int = end) -> Iterator[records.Pair]:
        for start in range(begin, end, _SHARD_CHUNK):
          for raw in reader.read(start, min(start + _SHARD_CHUNK, end)):
            yield records.decode(raw)

      records.write(os.path.join(out_dir, name), block())
  finally:
    reader.close()
  os.remove(path)
  return names


def _swap_in(tmp_dir: str, out_dir: str) -> None:
  if not os.path.exists(out_dir):
    os.rename(tmp_dir, out_dir)
    return
  if not os.listdir(out_dir):
    os.rmdir(out_dir)
    os.rename(tmp_dir, out_dir)
    return
  old = _sibling(out_dir, 'old')
  os.rename(out_dir, old)
  os.rename(tmp_dir, out_dir)
  shutil.rmtree(old)


def _sibling(out_dir: str, kind: str) -> str:
  # Beside out_dir, so the final rename stays on one filesystem (atomic).
  parent, name = os.path.split(os.path.abspath(out_dir))
  return os.path.join(parent, f'.{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}')


def prepare(inputs: Mapping[str, Source], out_dir: str | os.PathLike, *, overwrite: bool = False,
            train_shards: int = 1, max_chars: int = DEFAULT_MAX_CHARS,
            description: str | None = None,
            command_line: Mapping[str, Any] | None = None) -> Stats:
  """Writes OUT/{split}.array_record (train maybe sharded) and OUT/stats.json.

  Everything is checked first and written into a temp dir beside out_dir that
  is renamed into place at the end, so a failure leaves out_dir as it was.

  Args:
    inputs: split name -> its source, written in this order.
    out_dir: must not exist, be empty, or (with overwrite) be a prepare output.
    overwrite: replace an earlier prepare output.
    train_shards: >1 splits train into that many contiguous, ordered files.
    max_chars: a longer field skips its line as `field_too_long`.
    description: what the input is, for stats.json; default from the sources.
    command_line: the CLI flags, recorded in stats.json.

  Returns:
    The stats also written to stats.json.

  Raises:
    PrepareError: a bad request (missing file, misaligned files, a split with
      no good line, ...). Bad lines never raise; they are counted.
  """
  given_out_dir = os.fspath(out_dir)
  out_dir = os.path.abspath(given_out_dir)  # 'out/' and 'out' must name one sibling
  if not inputs:
    raise PrepareError('no input splits given')
  for split in inputs:
    if not _SPLIT_NAME.fullmatch(split):
      raise PrepareError(f'split name {split!r} must match {_SPLIT_NAME.pattern}')
  if train_shards < 1:
    raise PrepareError(f'--train_shards must be >= 1, not {train_shards}')
  if train_shards > 1 and 'train' not in inputs:
    raise PrepareError('--train_shards needs a train split')
  if max_chars < 1:
    raise PrepareError(f'--max_chars must be >= 1, not {max_chars}')
  _check_out_dir(out_dir, overwrite)
  for source in inputs.values():
    source.check()

  options = {'out_dir': given_out_dir, 'overwrite': overwrite, 'train_shards': train_shards,
             'max_chars': max_chars}
  flag_record = options | dict(command_line or {})
  description = description or '; '.join(f'{k}: {v.describe()}' for k, v in inputs.items())

  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = _sibling(out_dir, 'tmp')
  os.mkdir(tmp_dir)  # not mkdtemp: its 0700 would survive the rename
  try:
    splits = {}
    for split, source in inputs.items():
      name = f'{split}.array_record'
      counter, n_records = _write_split(split, source, os.path.join(tmp_dir, name), max_chars)
      inputs_abs = tuple(os.path.abspath(p) for p in source.paths)
      if n_records == 0:
        partial = counter.freeze(inputs_abs, (), 0)
        raise PrepareError(
            f'{split} has no good records: {counter.lines_read} lines read from '
            f'{", ".join(source.paths)}, skipped: {_skipped_text(partial)}; check the input '
            'format')
      outputs = (name,)
      if split == 'train' and train_shards > 1:
        if n_records < train_shards:
          raise PrepareError(f'train has {n_records} records, fewer than --train_shards '
                             f'{train_shards}')
        outputs = _shard(os.path.join(tmp_dir, name), split, n_records, train_shards)
      splits[split] = counter.freeze(inputs_abs, outputs, n_records)
    stats = Stats(description, flag_record, splits)
    with open(os.path.join(tmp_dir, STATS_FILE), 'w', encoding='utf-8') as f:
      json.dump(stats.to_json(), f, indent=2, ensure_ascii=False)
      f.write('\n')
    _swap_in(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return stats


# ------------------------------------------------------------------------- CLI

_MODE_FLAGS = {
    'mtnt': ('mtnt_dir',),
    'tsv': tuple(f'{s}_tsv' for s in SPLITS),
    'text': tuple(f'{s}_{side}' for s in SPLITS for side in ('src', 'dst')),
    'jsonl': tuple(f'{s}_jsonl' for s in SPLITS),
}
_flags_defined = False


def define_flags() -> None:
  """Defines the CLI flags; the CLI module calls it, so importing this doesn't.

  Generic names like --out_dir would otherwise collide with the flags of any
  trainer or benchmark that imports `prepare` as a library.
  """
  global _flags_defined
  if _flags_defined:
    return
  _flags_defined = True
  flags.DEFINE_string('out_dir', None, 'Output dir for {split}.array_record and stats.json.')
  flags.DEFINE_alias('out', 'out_dir')  # the spelling configs/ and pipeline.py messages use
  flags.DEFINE_bool('overwrite', False, 'Replace out_dir if it holds an earlier prepare output.')
  # Bounds and --pair are checked in sources_from_flags, not by absl: its
  # parse errors take two lines and exit 1 like an input error.
  flags.DEFINE_integer('train_shards', 1, 'Split train into this many ordered files.')
  flags.DEFINE_integer('max_chars', DEFAULT_MAX_CHARS,
                       'Skip a line whose field is longer (field_too_long).')
  flags.DEFINE_string('mtnt_dir', None, 'Mode a: MTNT release dir (holds train/ valid/ test/).')
  flags.DEFINE_string('pair', None, f'Mode a: language pair, one of {", ".join(MTNT_PAIRS)}.')
  for split in SPLITS:
    optional = ' (optional)' if split == 'test' else ''
    flags.DEFINE_string(f'{split}_tsv', None,
                        f'Mode b: {split} TSV, [id<TAB>]source<TAB>target{optional}.')
    flags.DEFINE_string(f'{split}_src', None, f'Mode c: {split} source text{optional}.')
    flags.DEFINE_string(f'{split}_dst', None, f'Mode c: {split} target text, line-aligned.')
    flags.DEFINE_string(f'{split}_jsonl', None, f'Mode d: {split} JSON lines{optional}.')
  flags.DEFINE_string('src_field', 'src', 'Mode d: source field.')
  flags.DEFINE_string('dst_field', 'dst', 'Mode d: target field.')
  flags.DEFINE_string('id_field', 'id', 'Mode d: id field (optional in the data).')


def _flag_names() -> tuple[str, ...]:
  names = ['out_dir', 'overwrite', 'train_shards', 'max_chars', 'pair', 'src_field',
           'dst_field', 'id_field']
  return tuple(names) + tuple(n for mode in _MODE_FLAGS.values() for n in mode)


def sources_from_flags(values: Mapping[str, Any]) -> tuple[dict[str, Source], str]:
  """Flag values -> (split -> Source, input description); app.UsageError if inconsistent."""
  if not values.get('out_dir'):
    raise app.UsageError('--out_dir is required')
  for name in ('train_shards', 'max_chars'):
    if values.get(name) is not None and values[name] < 1:
      raise app.UsageError(f'--{name} must be >= 1, not {values[name]}')
  given = {mode: [n for n in names if values.get(n)] for mode, names in _MODE_FLAGS.items()}
  modes = [mode for mode, names in given.items() if names]
  if len(modes) != 1:
    used = ' and '.join(f'--{given[m][0]}' for m in modes)
    raise app.UsageError(
        'give exactly one input mode: --mtnt_dir, --{train,valid,test}_tsv, '
        '--{train,valid,test}_{src,dst} or --{train,valid,test}_jsonl'
        + (f' (got {used})' if modes else ''))
  mode = modes[0]
  if values.get('pair') and mode != 'mtnt':
    raise app.UsageError('--pair only applies to --mtnt_dir')

  if mode == 'mtnt':
    if values.get('pair') not in MTNT_PAIRS:
      raise app.UsageError(f'--mtnt_dir needs --pair, one of {", ".join(MTNT_PAIRS)}')
    mtnt_dir = values['mtnt_dir']
    if not os.path.isdir(mtnt_dir):
      raise PrepareError(f'MTNT dir not found: {mtnt_dir}')
    return mtnt_sources(mtnt_dir, values['pair']), f'MTNT {values["pair"]} release at {mtnt_dir}'

  sources: dict[str, Source] = {}
  for split in SPLITS:
    if mode == 'text':
      src, dst = values.get(f'{split}_src'), values.get(f'{split}_dst')
      if bool(src) != bool(dst):
        have, lack = ('src', 'dst') if src else ('dst', 'src')
        raise app.UsageError(f'--{split}_{have} needs --{split}_{lack}')
      if src:
        sources[split] = AlignedSource(src, dst)
    else:
      path = values.get(f'{split}_{mode}')
      if path and mode == 'tsv':
        sources[split] = TsvSource(path)
      elif path:
        sources[split] = JsonlSource(path, values.get('src_field') or 'src',
                                     values.get('dst_field') or 'dst',
                                     values.get('id_field') or 'id')
  for split in ('train', 'valid'):
    if split not in sources:
      flag = f'--{split}_src/--{split}_dst' if mode == 'text' else f'--{split}_{mode}'
      raise app.UsageError(f'{flag} is required (test is the only optional split)')
  description = '; '.join(f'{k}: {v.describe()}' for k, v in sources.items())
  return sources, description


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())


def main(argv: Sequence[str]) -> int:
  """CLI entry: one line on stderr and exit 2 (usage) or 1 (input) on error."""
  if len(argv) > 1:
    print(f'prepare: usage error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  values = {n: flags.FLAGS[n].value for n in _flag_names()}
  # stats.json records what was asked for, not every default of other modes.
  command_line = {n: v for n, v in values.items()
                  if flags.FLAGS[n].present or n in ('out_dir', 'overwrite', 'train_shards',
                                                     'max_chars')}
  start = time.monotonic()
  try:
    inputs, description = sources_from_flags(values)
    stats = prepare(inputs, values['out_dir'], overwrite=values['overwrite'],
                    train_shards=values['train_shards'], max_chars=values['max_chars'],
                    description=description,
                    command_line=command_line)
  except app.UsageError as e:
    print(f'prepare: usage error: {_one_line(e)} (see --helpshort)', file=sys.stderr)
    return 2
  except (PrepareError, OSError) as e:
    print(f'prepare: error: {_one_line(e)}', file=sys.stderr)
    return 1
  print(format_summary(stats, values['out_dir'], time.monotonic() - start))
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
