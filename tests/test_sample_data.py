"""The shipped en-fr sample corpus and tokenizer: reproducible, consistent, tokenizable."""

import os

import pytest
import sentencepiece as spm

from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu.data import records
from mtnt_tpu.data.sample import make

SAMPLE = os.path.dirname(make.__file__)
SPLITS = ('train', 'valid', 'test')
SIZES = {'train': 4000, 'valid': 200, 'test': 200}


def _prompt(src: str) -> str:
  return tokenizer_lib.prompt_text(src)


@pytest.fixture(scope='module')
def regenerated(tmp_path_factory):
  out = tmp_path_factory.mktemp('sample')
  make.main(['--out', str(out)])
  return out


@pytest.fixture(scope='module')
def shipped():
  return {s: make.read_tsv(os.path.join(SAMPLE, f'{s}.tsv')) for s in SPLITS}


@pytest.fixture(scope='module')
def sp():
  return spm.SentencePieceProcessor(model_file=os.path.join(SAMPLE, 'tokenizer.model'))


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


@pytest.mark.parametrize('split', SPLITS)
def test_regenerating_gives_the_shipped_files(regenerated, split):
  assert _read(regenerated / f'{split}.tsv') == _read(os.path.join(SAMPLE, f'{split}.tsv'))
  assert (records.read_all(regenerated / f'{split}.array_record') ==
          records.read_all(os.path.join(SAMPLE, f'{split}.array_record')))


def test_regenerating_gives_the_shipped_tokenizer(regenerated, sp):
  again = spm.SentencePieceProcessor(model_file=str(regenerated / 'tokenizer.model'))
  assert again.get_piece_size() == sp.get_piece_size()
  assert ([(again.id_to_piece(i), again.get_score(i)) for i in range(again.get_piece_size())] ==
          [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])


@pytest.mark.parametrize('split', SPLITS)
def test_array_records_hold_the_tsv_rows(shipped, split):
  assert records.read_all(os.path.join(SAMPLE, f'{split}.array_record')) == shipped[split]


def test_tsv_shape(shipped):
  for split, pairs in shipped.items():
    assert len(pairs) == SIZES[split]
    assert [p.id for p in pairs] == [f'sample-{split}-{i:06d}' for i in range(1, len(pairs) + 1)]
    for p in pairs:
      assert p.src and p.dst and p.src != p.dst
  with open(os.path.join(SAMPLE, 'train.tsv'), encoding='utf-8', newline='') as f:
    lines = f.read().split('\n')
  assert lines[-1] == '' and all(line.count('\t') == 2 for line in lines[:-1])
  # Quotes are text, not CSV quoting: some sources even start with one.
  assert sum('"' in p.src for p in shipped['train']) > 100
  assert any(p.src.startswith('"') for p in shipped['train'])
  assert any('«' in p.dst for p in shipped['train'])


def test_splits_are_disjoint(shipped):
  sources = {s: {p.src for p in pairs} for s, pairs in shipped.items()}
  for s in SPLITS:
    assert len(sources[s]) == len(shipped[s])  # no duplicates within a split
  assert not sources['train'] & sources['valid']
  assert not sources['train'] & sources['test']
  assert not sources['valid'] & sources['test']


def test_tokenizer_special_ids(sp):
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert [sp.id_to_piece(i) for i in range(4)] == ['<pad>', '<eos>', '<bos>', '<unk>']
  assert sp.get_piece_size() == make.VOCAB_SIZE


def test_tokenizer_round_trips_the_prompt_format(shipped, sp):
  for p in shipped['valid']:
    text = _prompt(p.src)
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert ids.count(sp.piece_to_id('\n')) == 2
    assert sp.decode(sp.encode(p.dst)) == p.dst


def test_no_unknown_or_byte_pieces_in_train(shipped, sp):
  pairs = shipped['train']
  encoded = sp.encode([_prompt(p.src) for p in pairs] + [p.dst for p in pairs])
  used = {i for ids in encoded for i in ids}
  assert sp.unk_id() not in used
  assert not [sp.id_to_piece(i) for i in used if sp.is_byte(i)]  # every character is a piece


def test_trained_tokenizers_fall_back_to_bytes(tmp_path, shipped):
  """tokenizer.train_model (the sample's and the benchmark's): no character is unknown."""
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(tokenizer_lib.train_model(
      (s for p in shipped['valid'] for s in (p.src, p.dst)), vocab_size=400))
  tok = tokenizer_lib.Tokenizer(str(path))
  text = 'Zoë says "¡Hola!" 😀 in 2024'
  ids = tok.encode_prompt(text, 'French')
  assert 3 not in ids  # <unk>
  assert tok.decode(ids[1:]) == tokenizer_lib.prompt_text(text)
  assert tok.encode('\n') == [tok.processor.piece_to_id('\n')]  # its own piece
  assert len(tok.encode('2024')) == 4  # digits split


def test_every_example_fits_64_tokens(shipped, sp):
  for pairs in shipped.values():
    for p in pairs:
      assert 1 + len(sp.encode(_prompt(p.src))) + len(sp.encode(p.dst)) + 1 <= 64
