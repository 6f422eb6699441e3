"""Parallel text -> the project's ArrayRecord files (one per split) + stats.json.

`readers` turns each split's input into `records.Pair`s and counted skips;
this module writes them atomically and records what was kept and skipped, and
why. A bad *request* (missing file, misaligned files, an output dir that
already holds data) stops everything before anything is written.

Library use (no flags involved):

  stats = prepare({'train': readers.TsvSource('train.tsv'),
                   'valid': readers.TsvSource('valid.tsv')}, '/tmp/out')

CLI: `python -m mtnt_tpu.prepare --help`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from typing import Any, Iterator, Mapping

from mtnt_tpu.data import records
from mtnt_tpu.data.readers import DEFAULT_MAX_CHARS
from mtnt_tpu.data.readers import Parsed
from mtnt_tpu.data.readers import PrepareError
from mtnt_tpu.data.readers import Skip
from mtnt_tpu.data.readers import Source

SAMPLE_SIZE = 5
STATS_FILE = 'stats.json'

_SPLIT_NAME = re.compile(r'[a-z0-9_]+')


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
    notes = ''.join(f', {k} {v}' for k, v in split.notes.items())
    rows.append(f'  {name:<6} {split.records:>9} records from {split.lines_read} lines; '
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
  parent, name = os.path.split(out_dir)
  return os.path.join(parent, f'.{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def clean_stale(out_dir: str) -> list[str]:
  """Removes the temp dirs of earlier prepares of out_dir that were killed.

  A `.tmp-` dir of a dead process is half-written: deleted. An `.old-` dir is
  the previous output, parked during the final swap: deleted when the swap
  completed (out_dir exists), renamed back into place when it did not.
  Returns the names it removed or restored.
  """
  parent, name = os.path.split(out_dir)
  stale = re.compile(rf'\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}')
  done = []
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    m = stale.fullmatch(entry)
    if not m or _pid_alive(int(m[2])):
      continue
    path = os.path.join(parent, entry)
    if m[1] == 'old' and not os.path.exists(out_dir):
      os.rename(path, out_dir)
    else:
      shutil.rmtree(path)
    done.append(entry)
  return done


def prepare(inputs: Mapping[str, Source], out_dir: str | os.PathLike, *, overwrite: bool = False,
            max_chars: int = DEFAULT_MAX_CHARS, description: str | None = None,
            command_line: Mapping[str, Any] | None = None) -> Stats:
  """Writes OUT/{split}.array_record and OUT/stats.json.

  Everything is checked first and written into a temp dir beside out_dir that
  is renamed into place at the end, so a failure leaves out_dir as it was; the
  temp dirs of an earlier prepare that was killed are cleaned up first.

  Args:
    inputs: split name -> its source, written in this order.
    out_dir: must not exist, be empty, or (with overwrite) be a prepare output.
    overwrite: replace an earlier prepare output.
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
  if max_chars < 1:
    raise PrepareError(f'--max_chars must be >= 1, not {max_chars}')
  clean_stale(out_dir)
  _check_out_dir(out_dir, overwrite)
  for source in inputs.values():
    source.check()

  options = {'out_dir': given_out_dir, 'overwrite': overwrite, 'max_chars': max_chars}
  flag_record = options | dict(command_line or {})
  description = description or '; '.join(f'{k}: {v.describe()}' for k, v in inputs.items())

  parent = os.path.dirname(out_dir)
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
      splits[split] = counter.freeze(inputs_abs, (name,), n_records)
    stats = Stats(description, flag_record, splits)
    with open(os.path.join(tmp_dir, STATS_FILE), 'w', encoding='utf-8') as f:
      json.dump(stats.to_json(), f, indent=2, ensure_ascii=False)
      f.write('\n')
    _swap_in(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return stats


