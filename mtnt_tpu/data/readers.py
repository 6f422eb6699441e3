"""Parallel text in four layouts -> `records.Pair`s, one `Parsed` per input line.

The MTNT release, a TSV per split, two line-aligned text files per split
(Multi30k, WMT) and JSON lines. A reader never raises on content: a bad line
becomes a `Skip` with its reason, because scraped text always has a few and one
must not cost the whole file. `check()` raises `PrepareError` when the input is
unusable as a whole (a missing file, misaligned files, an ambiguous layout).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import os
from typing import Iterator, Protocol

from mtnt_tpu.data import records

SPLITS = ('train', 'valid', 'test')
MTNT_PAIRS = ('en-fr', 'fr-en', 'en-ja', 'ja-en')
DEFAULT_MAX_CHARS = 2000

_BOM = b'\xef\xbb\xbf'
# Lines read up front to tell a 3-column TSV from a 2-column one.
_SNIFF_LINES = 1000


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
  """`source<TAB>target` rows, or `id<TAB>source<TAB>target` with columns=3.

  Double quotes are text, never CSV quoting: MTNT has `"` in comments, and a
  CSV reader would swallow the lines after an unbalanced one. Three columns
  are never guessed: (en, fr, fr) would silently become (id, src, dst).
  """

  path: str
  columns: int = 2

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,)

  def describe(self) -> str:
    return f'TSV {self.path} ({self.columns} columns)'

  def check(self) -> None:
    if self.columns not in (2, 3):
      raise PrepareError(f'TSV columns must be 2 or 3, not {self.columns}')
    _check_file(self.path)
    counts = _column_counts(self.path, _SNIFF_LINES)
    if self.columns == 2 and counts.get(3, 0) > counts.get(2, 0):
      raise PrepareError(
          f'{self.path} has 3 tab-separated columns on {counts[3]} of its first '
          f'{sum(counts.values())} lines; pass --tsv_columns=3 if they are '
          'id<TAB>source<TAB>target, else cut the file to source<TAB>target')

  def read(self, split: str, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Parsed]:
    for line in _lines(self.path):
      notes = _crlf_note(line)
      if line.text is None:
        yield Parsed(line.no, Skip(SkipReason.INVALID_UTF8, self.path), notes)
        continue
      if not line.text.strip():
        yield Parsed(line.no, Skip(SkipReason.EMPTY_SOURCE, self.path), notes)
        continue
      fields = line.text.split('\t')
      if len(fields) != self.columns:
        yield Parsed(line.no, Skip(SkipReason.WRONG_COLUMN_COUNT, self.path), notes)
        continue
      pair_id = fields[0].strip() if self.columns == 3 else ''
      if not pair_id:
        if self.columns == 3:
          notes += (Note.EMPTY_ID,)
        pair_id = f'{split}-{line.no}'
      result = _pair_or_skip(pair_id, fields[-2], fields[-1], max_chars=max_chars,
                             src_path=self.path, dst_path=self.path)
      yield Parsed(line.no, result, notes)


def _column_counts(path: str, limit: int) -> dict[int, int]:
  """Tab-separated field counts of the first `limit` non-blank UTF-8 lines."""
  counts: dict[int, int] = {}
  for line in itertools.islice(
      (x for x in _lines(path) if x.text is not None and x.text.strip()), limit):
    n = line.text.count('\t') + 1
    counts[n] = counts.get(n, 0) + 1
  return counts


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
