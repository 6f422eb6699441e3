"""Export to the Kaggle Flax layout, and gemma's own loader and sampler on it."""

import json

import jax
import numpy as np
import pytest
import sentencepiece as spm
from gemma import params as gemma_params
from gemma import sampler as gemma_sampler
from gemma import transformer as gemma_transformer

from mtnt_tpu import evaluate
from mtnt_tpu import export
from mtnt_tpu import formats
from mtnt_tpu import model as model_lib
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import workdir as workdir_lib
from tests import trained_run

pytestmark = pytest.mark.slow  # needs the shared trained run


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  wd = trained_run.workdir(tmp_path_factory)
  out = tmp_path_factory.mktemp('export') / 'out'
  path = export.export(str(wd), str(out))
  return wd, out, path


def test_export_writes_the_kaggle_layout_and_the_tokenizer(exported):
  wd, out, path = exported
  assert sorted(p.name for p in out.iterdir()) == ['mtnt_export.json', 'tiny', 'tokenizer.model']
  manifest = json.loads((out / 'mtnt_export.json').read_text())
  assert manifest['origin'] == 'best' and manifest['variant'] == 'tiny'
  raw = gemma_params.load_params(path)
  assert 'transformer/layer_0/mlp/linear' in raw and 'w' in raw['transformer/layer_0/mlp/linear']
  config = workdir_lib.load_config(str(wd))
  trained = workdir_lib.restore(str(wd), config)
  loaded = gemma_params.load_and_format_params(path)['transformer']
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               loaded, trained.params)


def test_gemma_sampler_on_the_export_translates_like_translate(exported):
  """gemma.sampler.Sampler, knowing nothing of mtnt_tpu but the prompt text."""
  wd, out, path = exported
  best = int(json.loads((out / 'mtnt_export.json').read_text())['step'])
  # The eval hypotheses of that step; tests/test_translate.py shows translate gives these.
  samples = evaluate.read_samples(wd / 'samples' / f'step_{best}.txt')[:6]
  vocab = spm.SentencePieceProcessor(model_file=str(out / 'tokenizer.model'))
  params = gemma_params.load_and_format_params(path)['transformer']
  sampler = gemma_sampler.Sampler(
      transformer=gemma_transformer.Transformer(model_lib.build_config('tiny',
                                                                       vocab.get_piece_size())),
      vocab=vocab, params=params, cache_length=128)
  with jax.numpy_rank_promotion('allow'):  # gemma's sampler broadcasts implicitly
    got = sampler([tokenizer_lib.prompt_text(s.source) for s in samples],
                  total_generation_steps=64, return_logits=False)
  # The sampler runs to EOS; translate also stops at a newline and trims.
  assert [tokenizer_lib.cut_answer(t).strip() for t in got.text] == [
      s.hypothesis for s in samples]


def test_export_never_overwrites(exported, tmp_path):
  wd, out, _ = exported
  before = sorted(p.name for p in out.iterdir())
  with pytest.raises(workdir_lib.WorkdirError, match='already exists'):
    export.export(str(wd), str(out))
  assert sorted(p.name for p in out.iterdir()) == before
  with pytest.raises(workdir_lib.WorkdirError, match='config.json is missing'):
    export.export(str(tmp_path), str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()


def test_export_dtype_casts_every_weight(exported, tmp_path):
  wd, full, full_path = exported
  out = tmp_path / 'bf16'
  r = trained_run.run_module('export', '--workdir', str(wd), '--out', str(out),
                             '--dtype', 'bfloat16')
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((out / export.MANIFEST).read_text())['dtype'] == 'bfloat16'
  half = gemma_params.load_params(str(out / 'tiny'))
  want = gemma_params.load_params(full_path)  # float32, as trained
  assert {str(np.asarray(x).dtype) for x in jax.tree.leaves(half)} == {'bfloat16'}
  jax.tree.map(lambda h, f: np.testing.assert_array_equal(
      np.asarray(h), np.asarray(f).astype(h.dtype)), half, want)


def test_export_hf_loads_back_as_the_trained_weights(exported, tmp_path):
  wd, _, _ = exported
  out = tmp_path / 'hf'
  path = export.export(str(wd), str(out), fmt=formats.HF, dtype='float32')
  assert sorted(p.name for p in out.iterdir()) == [
      'config.json', 'generation_config.json', 'model.safetensors', 'mtnt_export.json',
      'tokenizer.model', 'tokenizer_config.json']
  # transformers' AutoTokenizer: the class, and Gemma's BOS added to every text.
  tok_config = json.loads((out / 'tokenizer_config.json').read_text())
  assert (tok_config['tokenizer_class'], tok_config['add_bos_token']) == ('GemmaTokenizer', True)
  trained = workdir_lib.restore(str(wd), workdir_lib.load_config(str(wd)))
  loaded = formats.load(path, trained.setup.abstract_params, 'tiny')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               loaded, trained.params)
  with pytest.raises(workdir_lib.WorkdirError, match='--format peft writes LoRA adapters'):
    export.export(str(wd), str(tmp_path / 'peft'), fmt=formats.PEFT)
  assert not (tmp_path / 'peft').exists()
