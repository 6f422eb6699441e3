"""python -m mtnt_tpu.prepare (one input mode) --out_dir DIR [--overwrite]

Parallel text -> OUT/{train,valid,test}.array_record + OUT/stats.json (see
mtnt_tpu.data.prepare). Give exactly one input mode:

  a. --mtnt_dir DIR --pair en-fr            the MTNT release
  b. --{train,valid,test}_tsv FILE          [id<TAB>]source<TAB>target
  c. --{train,valid,test}_{src,dst} FILE    line-aligned text (Multi30k, WMT)
  d. --{train,valid,test}_jsonl FILE        JSON lines

An error is one line on stderr: exit 2 for a usage error, 1 for a bad input.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags

from mtnt_tpu.data import prepare as prepare_lib
from mtnt_tpu.data import readers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  # Bounds and --pair are checked in sources_from_flags, not by absl: its
  # parse errors take two lines and exit 1 like an input error.
  flags.DEFINE_string('out_dir', None, 'Output dir for {split}.array_record and stats.json.')
  flags.DEFINE_alias('out', 'out_dir')  # the spelling configs/ and pipeline.py messages use
  flags.DEFINE_bool('overwrite', False, 'Replace out_dir if it holds an earlier prepare output.')
  flags.DEFINE_integer('max_chars', readers.DEFAULT_MAX_CHARS,
                       'Skip a line whose field is longer (field_too_long).')
  flags.DEFINE_string('mtnt_dir', None, 'Mode a: MTNT release dir (holds train/ valid/ test/).')
  flags.DEFINE_string('pair', None,
                      f'Mode a: language pair, one of {", ".join(readers.MTNT_PAIRS)}.')
  for split in readers.SPLITS:
    optional = ' (optional)' if split == 'test' else ''
    flags.DEFINE_string(f'{split}_tsv', None, f'Mode b: {split} TSV{optional}.')
    flags.DEFINE_string(f'{split}_src', None, f'Mode c: {split} source text{optional}.')
    flags.DEFINE_string(f'{split}_dst', None, f'Mode c: {split} target text, line-aligned.')
    flags.DEFINE_string(f'{split}_jsonl', None, f'Mode d: {split} JSON lines{optional}.')
  flags.DEFINE_integer('tsv_columns', 2, 'Mode b: 2 (source<TAB>target) or 3 '
                       '(id<TAB>source<TAB>target); never guessed.')
  flags.DEFINE_string('src_field', 'src', 'Mode d: source field.')
  flags.DEFINE_string('dst_field', 'dst', 'Mode d: target field.')
  flags.DEFINE_string('id_field', 'id', 'Mode d: id field (optional in the data).')


_MODE_FLAGS = {
    'mtnt': ('mtnt_dir',),
    'tsv': tuple(f'{s}_tsv' for s in readers.SPLITS),
    'text': tuple(f'{s}_{side}' for s in readers.SPLITS for side in ('src', 'dst')),
    'jsonl': tuple(f'{s}_jsonl' for s in readers.SPLITS),
}
_OPTIONS = ('out_dir', 'overwrite', 'max_chars', 'pair', 'tsv_columns', 'src_field', 'dst_field',
            'id_field')
_ALWAYS_RECORDED = ('out_dir', 'overwrite', 'max_chars')


def sources_from_flags(values: Mapping[str, Any]) -> tuple[dict[str, readers.Source], str]:
  """Flag values -> (split -> Source, input description); app.UsageError if inconsistent."""
  if not values.get('out_dir'):
    raise app.UsageError('--out_dir is required')
  if values.get('max_chars') is not None and values['max_chars'] < 1:
    raise app.UsageError(f'--max_chars must be >= 1, not {values["max_chars"]}')
  if values.get('tsv_columns') not in (None, 2, 3):
    raise app.UsageError(f'--tsv_columns must be 2 or 3, not {values["tsv_columns"]}')
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
    if values.get('pair') not in readers.MTNT_PAIRS:
      raise app.UsageError(f'--mtnt_dir needs --pair, one of {", ".join(readers.MTNT_PAIRS)}')
    mtnt_dir = values['mtnt_dir']
    if not os.path.isdir(mtnt_dir):
      raise readers.PrepareError(f'MTNT dir not found: {mtnt_dir}')
    return (readers.mtnt_sources(mtnt_dir, values['pair']),
            f'MTNT {values["pair"]} release at {mtnt_dir}')

  sources: dict[str, readers.Source] = {}
  for split in readers.SPLITS:
    if mode == 'text':
      src, dst = values.get(f'{split}_src'), values.get(f'{split}_dst')
      if bool(src) != bool(dst):
        have, lack = ('src', 'dst') if src else ('dst', 'src')
        raise app.UsageError(f'--{split}_{have} needs --{split}_{lack}')
      if src:
        sources[split] = readers.AlignedSource(src, dst)
    else:
      path = values.get(f'{split}_{mode}')
      if path and mode == 'tsv':
        sources[split] = readers.TsvSource(path, values.get('tsv_columns') or 2)
      elif path:
        sources[split] = readers.JsonlSource(path, values.get('src_field') or 'src',
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
  if len(argv) > 1:
    print(f'prepare: usage error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  names = _OPTIONS + tuple(n for mode in _MODE_FLAGS.values() for n in mode)
  values = {n: FLAGS[n].value for n in names}
  # stats.json records what was asked for, not every default of other modes.
  command_line = {n: v for n, v in values.items() if FLAGS[n].present or n in _ALWAYS_RECORDED}
  start = time.monotonic()
  try:
    inputs, description = sources_from_flags(values)
    stats = prepare_lib.prepare(inputs, values['out_dir'], overwrite=values['overwrite'],
                                max_chars=values['max_chars'], description=description,
                                command_line=command_line)
  except app.UsageError as e:
    print(f'prepare: usage error: {_one_line(e)} (see --help)', file=sys.stderr)
    return 2
  except (readers.PrepareError, OSError) as e:
    print(f'prepare: error: {_one_line(e)}', file=sys.stderr)
    return 1
  print(prepare_lib.format_summary(stats, values['out_dir'], time.monotonic() - start))
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
