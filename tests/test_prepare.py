"""prepare: every bad line kind skipped and counted exactly, every good one kept in order."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mtnt_tpu import commands
from mtnt_tpu import prepare as cli
from mtnt_tpu.data import prepare as prep
from mtnt_tpu.data import readers as rd
from mtnt_tpu.data import records
from mtnt_tpu.data.records import Pair

REPO = pathlib.Path(__file__).resolve().parents[1]
LONG = 'x' * 100_000

# (raw line bytes, the pair it must become or None when skipped). Line numbers
# are positions in these lists, 1-based.
TRAIN_LINES: list[tuple[bytes, Pair | None]] = [
    (b'\xef\xbb\xbfid1\tHello world\tBonjour le monde\r\n',
     Pair('id1', 'Hello world', 'Bonjour le monde')),  # BOM + CRLF
    (b'id2\tmissing tab here\n', None),  # wrong_column_count
    (b'id3\tHe said "hi"\tIl a dit "salut"\n', Pair('id3', 'He said "hi"', 'Il a dit "salut"')),
    (b'id4\ta\tb\tc\n', None),  # wrong_column_count (extra tab)
    (b'id5\t \tVide\n', None),  # empty_source
    (b'id6\tEmpty target\t   \n', None),  # empty_target
    (b'id7\tbad \xff\xfe bytes\tmauvais\n', None),  # invalid_utf8
    # An unbalanced leading quote: a CSV reader would swallow the next lines.
    (b'id8\t"quoted start\tdebut "cite\r\n', Pair('id8', '"quoted start', 'debut "cite')),
    (b'id9\t' + LONG.encode() + b'\tlong\n', None),  # field_too_long
    (b'  id10 \t  padded source \t padded target  \n',
     Pair('id10', 'padded source', 'padded target')),
    (b'\n', None),  # empty_source (blank line)
    ('id12\tcafé — ok\tcafé\n'.encode(), Pair('id12', 'café — ok', 'café')),
    ('id13\tlast line\tdernière ligne'.encode(), Pair('id13', 'last line', 'dernière ligne')),
]
TRAIN_SKIPPED = {
    'empty_source': (2, [5, 11]),
    'empty_target': (1, [6]),
    'field_too_long': (1, [9]),
    'invalid_utf8': (1, [7]),
    'wrong_column_count': (2, [2, 4]),
}

# More than SAMPLE_SIZE lines of one reason: the sample keeps the first five.
VALID_LINES: list[tuple[bytes, Pair | None]] = [
    (b'v1\tone\tun\n', Pair('v1', 'one', 'un')),
    *[(b'bad line %d\n' % i, None) for i in range(7)],  # lines 2..8: wrong_column_count
    (b'v9\tnine\tneuf\n', Pair('v9', 'nine', 'neuf')),
]

TEST_LINES: list[tuple[bytes, Pair | None]] = [
    (b't1\t\x80\tx\r\n', None),  # invalid_utf8 on a CRLF line: still a CRLF line
    (b't2\tgood\tbon\n', Pair('t2', 'good', 'bon')),
]


def _write(path: pathlib.Path, lines: list[tuple[bytes, Pair | None]]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b''.join(raw for raw, _ in lines))
  return path


def _good(lines: list[tuple[bytes, Pair | None]]) -> list[Pair]:
  return [pair for _, pair in lines if pair is not None]


def _fake_mtnt(root: pathlib.Path) -> pathlib.Path:
  for split, lines in (('train', TRAIN_LINES), ('valid', VALID_LINES), ('test', TEST_LINES)):
    _write(root / split / f'{split}.en-fr.tsv', lines)
  return root


def _tsv(path: pathlib.Path, rows: list[str]) -> pathlib.Path:
  path.write_text(''.join(r + '\n' for r in rows), encoding='utf-8')
  return path


def _leftovers(parent: pathlib.Path) -> list[str]:
  return [p.name for p in parent.iterdir() if p.name.startswith('.')]


def test_mtnt_bad_lines_skipped_and_counted_exactly(tmp_path):
  mtnt = _fake_mtnt(tmp_path / 'MTNT')
  out = tmp_path / 'out'
  stats = prep.prepare(rd.mtnt_sources(str(mtnt), 'en-fr'), out)

  assert sorted(os.listdir(out)) == [
      'stats.json', 'test.array_record', 'train.array_record', 'valid.array_record']
  for split, lines in (('train', TRAIN_LINES), ('valid', VALID_LINES), ('test', TEST_LINES)):
    assert records.read_all(out / f'{split}.array_record') == _good(lines), split

  on_disk = json.loads((out / 'stats.json').read_text())
  assert on_disk == stats.to_json()
  train_file = str(mtnt / 'train' / 'train.en-fr.tsv')
  train = on_disk['splits']['train']
  assert train['inputs'] == [train_file]
  assert train['outputs'] == ['train.array_record']
  assert (train['lines_read'], train['records'], train['lines_skipped']) == (13, 6, 7)
  assert train['skipped'] == {
      reason: {'count': count, 'lines': lines, 'files': [train_file]}
      for reason, (count, lines) in TRAIN_SKIPPED.items()
  }
  assert train['notes'] == {'crlf_lines': 2}

  valid = on_disk['splits']['valid']
  assert (valid['lines_read'], valid['records']) == (9, 2)
  assert valid['skipped'] == {'wrong_column_count': {
      'count': 7, 'lines': [2, 3, 4, 5, 6], 'files': [str(mtnt / 'valid' / 'valid.en-fr.tsv')]}}
  assert valid['notes'] == {}

  test = on_disk['splits']['test']
  assert (test['lines_read'], test['records']) == (2, 1)
  assert test['skipped']['invalid_utf8']['lines'] == [1]
  assert test['notes'] == {'crlf_lines': 1}

  assert on_disk['input'].startswith(f'train: TSV {train_file} (3 columns); valid: TSV ')
  assert on_disk['flags']['max_chars'] == rd.DEFAULT_MAX_CHARS
  assert _leftovers(tmp_path) == []


def test_reader_yields_every_line_in_order(tmp_path):
  path = _write(tmp_path / 'train.tsv', TRAIN_LINES)
  parsed = list(rd.TsvSource(str(path), columns=3).read('train'))
  assert [p.line_no for p in parsed] == list(range(1, len(TRAIN_LINES) + 1))
  assert [p.result if isinstance(p.result, Pair) else None for p in parsed] == [
      pair for _, pair in TRAIN_LINES]
  assert parsed[1].result == rd.Skip(rd.SkipReason.WRONG_COLUMN_COUNT, str(path))


def test_max_chars_is_inclusive(tmp_path):
  path = _tsv(tmp_path / 'a.tsv', ['a' * 10 + '\tok', 'b' * 11 + '\tok', 'ok\t' + 'c' * 11])
  results = [p.result for p in rd.TsvSource(str(path)).read('train', max_chars=10)]
  assert results[0] == Pair('train-1', 'a' * 10, 'ok')
  assert [r.reason for r in results[1:]] == [rd.SkipReason.FIELD_TOO_LONG] * 2


def test_tsv_mode_two_and_three_columns(tmp_path):
  two = _tsv(tmp_path / 'two.tsv', ['a\tb\tc\td', 'Hello\tBonjour', 'x\ty\tz', 'Yes\tOui'])
  three = _tsv(tmp_path / 'three.tsv', ['\tno id\tpas d\'id', 'k2\tTwo\tDeux', 'only\ttwo'])
  out = tmp_path / 'out'
  stats = prep.prepare({'train': rd.TsvSource(str(two)),
                        'valid': rd.TsvSource(str(three), columns=3)}, out)
  assert records.read_all(out / 'train.array_record') == [
      Pair('train-2', 'Hello', 'Bonjour'), Pair('train-4', 'Yes', 'Oui')]
  assert records.read_all(out / 'valid.array_record') == [
      Pair('valid-1', 'no id', "pas d'id"), Pair('k2', 'Two', 'Deux')]
  assert stats.splits['train'].skipped['wrong_column_count'].lines == (1, 3)
  assert stats.splits['valid'].skipped['wrong_column_count'].lines == (3,)
  assert stats.splits['valid'].notes == {'empty_id': 1}


def test_three_column_tsv_is_never_guessed(tmp_path):
  """(en, fr, fr) must not silently become (id, src, dst): fr->fr pairs."""
  rows = ['Hello\tBonjour\tSalut', 'Yes\tOui\tOuais', 'odd\tline']
  three = _tsv(tmp_path / 'en_fr_fr.tsv', rows)
  valid = _tsv(tmp_path / 'valid.tsv', ['v1\ta\tb'])
  out = tmp_path / 'out'
  with pytest.raises(rd.PrepareError, match='--tsv_columns=3'):
    prep.prepare({'train': rd.TsvSource(str(three)), 'valid': rd.TsvSource(str(valid))}, out)
  assert not out.exists() and _leftovers(tmp_path) == []

  bad = _cli(f'--train_tsv={three}', f'--valid_tsv={valid}', f'--out_dir={out}')
  assert bad.returncode == 1 and bad.stderr.count('\n') == 1, bad.stderr
  assert str(three) in bad.stderr and '--tsv_columns=3' in bad.stderr
  ok = _cli(f'--train_tsv={three}', f'--valid_tsv={valid}', f'--out_dir={out}',
            '--tsv_columns=3')
  assert ok.returncode == 0, ok.stderr
  assert records.read_all(out / 'train.array_record') == [
      Pair('Hello', 'Bonjour', 'Salut'), Pair('Yes', 'Oui', 'Ouais')]


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_temp_dirs_of_a_killed_prepare_are_cleaned_up(tmp_path):
  out = tmp_path / 'out'
  dead, alive = _dead_pid(), os.getppid()
  # A killed prepare's half-written output, and a running one's (kept).
  (tmp_path / f'.out.tmp-{dead}-0123abcd').mkdir()
  (tmp_path / f'.out.tmp-{dead}-0123abcd' / 'train.array_record').write_text('half')
  (tmp_path / f'.out.tmp-{alive}-89abcdef').mkdir()
  (tmp_path / f'.other.tmp-{dead}-0123abcd').mkdir()  # another output's: not ours
  prep.prepare(_small_inputs(tmp_path), out)
  assert sorted(_leftovers(tmp_path)) == [f'.other.tmp-{dead}-0123abcd',
                                          f'.out.tmp-{alive}-89abcdef']


def test_output_parked_by_a_killed_swap_is_restored(tmp_path):
  """Killed between moving the old output aside and moving the new one in."""
  out = tmp_path / 'out'
  prep.prepare(_small_inputs(tmp_path, 'first'), out)
  dead = _dead_pid()
  out.rename(tmp_path / f'.out.old-{dead}-0123abcd')
  (tmp_path / f'.out.tmp-{dead}-89abcdef').mkdir()
  with pytest.raises(rd.PrepareError, match='--overwrite'):
    prep.prepare(_small_inputs(tmp_path, 'second'), out)
  assert records.read_all(out / 'train.array_record') == [Pair('train-1', 'first', 'y')]
  assert _leftovers(tmp_path) == []


def test_help_lists_the_flags():
  shown = _cli('--help')  # absl exits 1 after --help
  for flag in ('--out_dir', '--mtnt_dir', '--pair', '--train_tsv', '--tsv_columns',
               '--valid_src', '--test_jsonl', '--max_chars', '--overwrite'):
    assert flag in shown.stdout, flag


def test_aligned_text_mode(tmp_path):
  src = tmp_path / 'train.en'
  dst = tmp_path / 'train.fr'
  src.write_bytes(b'\xef\xbb\xbfOne\r\nTwo\n\xc3(\nFour\nFive\twith tab')
  dst.write_bytes(b'Un\nDeux\nTrois\n  \nCinq\tavec tab')
  vsrc = _tsv(tmp_path / 'val.en', ['Hi'])
  vdst = _tsv(tmp_path / 'val.fr', ['Salut'])
  out = tmp_path / 'out'
  stats = prep.prepare({'train': rd.AlignedSource(str(src), str(dst)),
                        'valid': rd.AlignedSource(str(vsrc), str(vdst))}, out)
  assert records.read_all(out / 'train.array_record') == [
      Pair('train-1', 'One', 'Un'), Pair('train-2', 'Two', 'Deux'),
      Pair('train-5', 'Five\twith tab', 'Cinq\tavec tab')]
  assert records.read_all(out / 'valid.array_record') == [Pair('valid-1', 'Hi', 'Salut')]
  train = stats.splits['train']
  assert train.lines_read == 5
  assert train.skipped == {
      'empty_target': prep.ReasonStats(1, (4,), (str(dst),)),
      'invalid_utf8': prep.ReasonStats(1, (3,), (str(src),)),
  }
  assert train.notes == {'crlf_lines': 1}


def test_aligned_mismatched_line_counts_is_an_error(tmp_path):
  src = _tsv(tmp_path / 'train.en', ['a', 'b', 'c'])
  dst = _tsv(tmp_path / 'train.fr', ['x', 'y'])
  out = tmp_path / 'out'
  with pytest.raises(rd.PrepareError) as e:
    prep.prepare({'train': rd.AlignedSource(str(src), str(dst))}, out)
  assert f'{src} has 3 lines' in str(e.value) and f'{dst} has 2' in str(e.value)
  assert not out.exists() and _leftovers(tmp_path) == []


def test_jsonl_mode(tmp_path):
  lines = [
      '{"id": "j1", "en": " Hello ", "fr": "Bonjour"}',
      '{"en": "no id", "fr": "sans id"}',
      '{"id": 7, "en": "int id", "fr": "id entier"}',
      'not json',
      '["a", "list"]',
      '{"id": "j6", "en": "no target"}',
      '{"id": "j7", "en": "null target", "fr": null}',
      '{"id": "j8", "en": 3, "fr": "trois"}',
      '{"id": "j9", "en": "lone \\ud800 surrogate", "fr": "x"}',
      '{"id": "j10", "en": "He said \\"hi\\"", "fr": "Il a dit \\"salut\\""}',
      '',
  ]
  train = _tsv(tmp_path / 'train.jsonl', lines)
  valid = _tsv(tmp_path / 'valid.jsonl', ['{"en": "a", "fr": "b"}'])
  out = tmp_path / 'out'
  source = lambda p: rd.JsonlSource(str(p), src_field='en', dst_field='fr')
  stats = prep.prepare({'train': source(train), 'valid': source(valid)}, out)
  assert records.read_all(out / 'train.array_record') == [
      Pair('j1', 'Hello', 'Bonjour'), Pair('train-2', 'no id', 'sans id'),
      Pair('7', 'int id', 'id entier'), Pair('j10', 'He said "hi"', 'Il a dit "salut"')]
  skipped = {k: v.lines for k, v in stats.splits['train'].skipped.items()}
  assert skipped == {'invalid_json': (4, 5), 'missing_field': (6, 7), 'wrong_field_type': (8,),
                     'invalid_unicode': (9,), 'empty_source': (11,)}


def _small_inputs(tmp_path: pathlib.Path, text: str = 'x') -> dict[str, rd.Source]:
  train = _tsv(tmp_path / 'train.tsv', [f'{text}\ty'])
  valid = _tsv(tmp_path / 'valid.tsv', ['a\tb'])
  return {'train': rd.TsvSource(str(train)), 'valid': rd.TsvSource(str(valid))}


def test_existing_output_refused_without_overwrite(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('precious')
  with pytest.raises(rd.PrepareError, match='--overwrite'):
    prep.prepare(_small_inputs(tmp_path), out)
  # --overwrite still refuses a dir that prepare didn't write.
  with pytest.raises(rd.PrepareError, match='no stats.json'):
    prep.prepare(_small_inputs(tmp_path), out, overwrite=True)
  assert os.listdir(out) == ['keep.txt'] and (out / 'keep.txt').read_text() == 'precious'
  assert _leftovers(tmp_path) == []


def test_overwrite_replaces_an_earlier_output(tmp_path):
  out = tmp_path / 'out'
  prep.prepare(_small_inputs(tmp_path, 'first'), out)
  with pytest.raises(rd.PrepareError, match='already holds'):
    prep.prepare(_small_inputs(tmp_path, 'second'), out)
  prep.prepare(_small_inputs(tmp_path, 'second'), out, overwrite=True)
  assert records.read_all(out / 'train.array_record') == [Pair('train-1', 'second', 'y')]
  assert _leftovers(tmp_path) == []


def test_failure_leaves_the_old_output_untouched(tmp_path):
  out = tmp_path / 'out'
  prep.prepare(_small_inputs(tmp_path, 'first'), out)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  bad = _tsv(tmp_path / 'bad.tsv', ['no tabs at all', '\t\t'])
  inputs = _small_inputs(tmp_path) | {'valid': rd.TsvSource(str(bad))}
  with pytest.raises(rd.PrepareError, match='valid has no good records'):
    prep.prepare(inputs, out, overwrite=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert _leftovers(tmp_path) == []


def test_missing_input_names_the_file_and_writes_nothing(tmp_path):
  inputs = _small_inputs(tmp_path) | {'test': rd.TsvSource(str(tmp_path / 'nope.tsv'))}
  out = tmp_path / 'out'
  with pytest.raises(rd.PrepareError, match='nope.tsv'):
    prep.prepare(inputs, out)
  assert not out.exists() and _leftovers(tmp_path) == []


def test_flags_to_sources(tmp_path):
  base = {'out_dir': str(tmp_path / 'out')}
  sources, _ = cli.sources_from_flags(
      base | {'train_src': 'a.en', 'train_dst': 'a.fr', 'valid_src': 'b.en',
              'valid_dst': 'b.fr'})
  assert sources == {'train': rd.AlignedSource('a.en', 'a.fr'),
                     'valid': rd.AlignedSource('b.en', 'b.fr')}
  sources, _ = cli.sources_from_flags(
      base | {'train_jsonl': 'a', 'valid_jsonl': 'b', 'test_jsonl': 'c', 'src_field': 'en'})
  assert sources['test'] == rd.JsonlSource('c', src_field='en')
  for bad in ({}, {'train_tsv': 'a', 'valid_tsv': 'b', 'train_jsonl': 'c'},
              {'train_tsv': 'a'}, {'train_src': 'a', 'valid_src': 'b', 'valid_dst': 'c'},
              {'mtnt_dir': str(tmp_path)}, {'train_tsv': 'a', 'valid_tsv': 'b', 'pair': 'en-fr'}):
    with pytest.raises(cli.app.UsageError):
      cli.sources_from_flags(base | bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return commands.run(commands.command('prepare', *args), timeout=60)


def test_cli(tmp_path):
  mtnt = _fake_mtnt(tmp_path / 'MTNT')
  out = tmp_path / 'out'
  ok = _cli(f'--mtnt_dir={mtnt}', '--pair=en-fr', f'--out_dir={out}')
  assert ok.returncode == 0, ok.stderr
  assert 'train' in ok.stdout and 'wrong_column_count 2' in ok.stdout
  assert records.read_all(out / 'train.array_record')[-1].id == 'id13'
  assert json.loads((out / 'stats.json').read_text())['flags']['pair'] == 'en-fr'

  again = _cli(f'--mtnt_dir={mtnt}', '--pair=en-fr', f'--out_dir={out}')
  assert again.returncode == 1
  assert again.stderr.count('\n') == 1 and '--overwrite' in again.stderr

  missing = tmp_path / 'missing.tsv'
  lost = _cli(f'--train_tsv={missing}', f'--valid_tsv={missing}', f'--out_dir={tmp_path / "o"}')
  assert lost.returncode == 1
  assert lost.stderr.count('\n') == 1 and str(missing) in lost.stderr
  assert not (tmp_path / 'o').exists()

  usage = _cli(f'--out_dir={tmp_path / "o"}')
  assert usage.returncode == 2
  assert usage.stderr.count('\n') == 1 and 'exactly one input mode' in usage.stderr

  bad_pair = _cli(f'--mtnt_dir={mtnt}', '--pair=en-de', f'--out_dir={tmp_path / "o"}')
  assert bad_pair.returncode == 2
  assert bad_pair.stderr.count('\n') == 1 and 'en-fr, fr-en, en-ja, ja-en' in bad_pair.stderr
