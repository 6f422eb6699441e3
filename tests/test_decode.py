"""The sharded KV-cache decoder, and BLEU/chrF in the training loop."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import decode
from mtnt_tpu import evaluate
from mtnt_tpu import model as model_lib
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import workdir as workdir_lib
from mtnt_tpu.data import pipeline
from mtnt_tpu.data import records
from tests import trained_run

P, T = 40, 24  # the decoder under test: prompt tokens, new tokens


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = trained_run.workdir(tmp_path_factory)
  return wd, workdir_lib.restore(wd, workdir_lib.load_config(wd))


@pytest.fixture(scope='module')
def decoder(trained):
  _, tr = trained
  return decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P,
                        max_decode_len=T)


@pytest.fixture(scope='module')
def prompts(trained, decoder):
  _, tr = trained
  sources = [p.src for p in evaluate.eval_pairs(tr.setup.config.data, 12)]
  out = decoder.encode_prompts(sources)
  assert len({len(p) for p in out}) >= 4, 'the batch mixes prompt lengths'
  assert max(len(p) for p in out) <= P
  return out


def _greedy_without_cache(tr, prompts, stop_ids):
  """Reference: full forward pass over the unpadded sequence at every step, no cache."""
  model = model_lib.make_model(tr.setup.model_config)
  L = P + T
  forward = jax.jit(lambda p, x, s: model_lib.forward(model, p, x, jnp.arange(L)[None] + 0 * x, s))
  tokens = np.zeros((len(prompts), L), np.int32)
  lengths = np.array([len(p) for p in prompts])
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  out = [[] for _ in prompts]
  finished = np.zeros(len(prompts), bool)
  for _ in range(T):
    segments = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    logits = np.asarray(forward(tr.params, tokens, segments))
    for r in np.nonzero(~finished)[0]:
      nxt = int(np.argmax(logits[r, lengths[r] - 1]))
      out[r].append(nxt)
      tokens[r, lengths[r]] = nxt
      lengths[r] += 1
      finished[r] = nxt in stop_ids
    if finished.all():
      break
  return out


def test_batched_decoding_equals_decoding_each_alone(trained, decoder, prompts):
  _, tr = trained
  together = decoder.generate(tr.params, prompts)  # two batches of 8, mixed lengths
  alone = [decoder.generate(tr.params, [p])[0] for p in prompts]
  assert together == alone
  assert all(together), 'the model translates every sentence'


def test_cached_left_padded_decoding_equals_uncached_greedy(trained, decoder, prompts):
  _, tr = trained
  got = decoder.generate(tr.params, prompts)
  want = _greedy_without_cache(tr, prompts, decoder.stop_ids)
  for g, w in zip(got, want):
    assert g == w[:len(g)]
    # generate() drops the stop token; the reference shows which one it was.
    assert len(w) == len(g) + 1 and w[-1] in decoder.stop_ids
  # The trained format ends each answer with EOS: decoding stopped there, not at T.
  assert sum(w[-1] == tokenizer_lib.EOS for w in want) >= len(want) // 2


def test_empty_lines_give_empty_translations(trained, decoder):
  _, tr = trained
  out = decoder.translate(tr.params, ['', 'The boys read the newspapers.', '   '])
  assert out[0] == '' and out[2] == '' and out[1]


def test_overlong_prompt_is_cut_with_a_warning_not_an_error(trained, decoder, caplog):
  _, tr = trained
  sources = ['My gardens are pretty.', 'the big red car ' * 40, 'The boys read.']
  with caplog.at_level(logging.WARNING):
    out = decoder.translate(tr.params, sources)
  assert len(out) == 3 and out[1]
  assert 'line 2: the prompt is' in caplog.text and 'line 1:' not in caplog.text
  assert out[0] == decoder.translate(tr.params, sources[:1])[0]


def test_chat_template_is_one_format_for_training_evaluation_and_translation(trained):
  _, tr = trained
  tok = tr.setup.tokenizer
  prompt, target = tok.encode_example('The cat.', 'Le chat.', 'French', chat_template=True)
  assert prompt[0] == tokenizer_lib.BOS and tok.decode(prompt[1:]) == (
      '<start_of_turn>user\nTranslate this into French:\nThe cat.<end_of_turn>\n'
      '<start_of_turn>model\n')
  assert target[-1] == tokenizer_lib.EOS and tok.decode(target[:-1]) == 'Le chat.<end_of_turn>'
  # What the decoder feeds (evaluation and translate) is what training read.
  assert tok.encode_prompt('The cat.', 'French', chat_template=True) == prompt
  record = records.encode(records.Pair('x', 'The cat.', 'Le chat.'))
  ex = pipeline.tokenize_example(tok, 0, record, 'French', 128, chat_template=True)
  assert ex.inputs[:len(prompt)].tolist() == prompt
  assert ex.mask.sum() == len(target)
  # The tiny vocabulary spells <end_of_turn> in several pieces: the loop stops
  # at EOS (which training puts right after it) or a newline, and the text is
  # cut at <end_of_turn>. Gemma's vocabulary has it as one stop token.
  assert len(tok.encode(tokenizer_lib.END_OF_TURN)) > 1
  assert tok.stop_ids(chat_template=True) == tok.stop_ids()
  assert tokenizer_lib.EOS in tok.stop_ids() and tok.encode('\n')[-1] in tok.stop_ids()
  answer = 'Le chat.' + tokenizer_lib.END_OF_TURN + 'junk'
  assert tokenizer_lib.cut_answer(answer, chat_template=True) == 'Le chat.'
  assert tokenizer_lib.cut_answer('Le chat.\njunk') == 'Le chat.'


def test_sampling_options():
  logits = jnp.array([[0.0, 3.0, 2.9, -1.0, 1.0]] * 4)
  rng = jax.random.key_data(jax.random.key(0))
  greedy = decode.choose_tokens(logits, rng, decode.Sampling())
  assert greedy.tolist() == [1] * 4
  for s in (decode.Sampling(temperature=1.0, top_k=1), decode.Sampling(temperature=1.0,
                                                                       top_p=1e-3)):
    assert decode.choose_tokens(logits, rng, s).tolist() == [1] * 4
  top2 = decode.Sampling(temperature=5.0, top_k=2)
  seen = {int(t) for i in range(20)
          for t in decode.choose_tokens(logits, jax.random.fold_in(rng, i), top2)}
  assert seen == {1, 2}
  nucleus = decode.Sampling(temperature=1.0, top_p=0.7)  # {1: 0.47, 2: 0.43, ...}
  seen = {int(t) for i in range(20)
          for t in decode.choose_tokens(logits, jax.random.fold_in(rng, i), nucleus)}
  assert seen == {1, 2}
  with pytest.raises(ValueError, match='top_p'):
    decode.Sampling(top_p=0.0)


def test_training_logs_bleu_chrf_and_samples_at_every_eval(trained):
  wd, _ = trained
  with open(wd / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 50, 100]
  for r in evals:
    assert 0 <= r['eval_bleu'] <= 100 and 0 <= r['eval_chrf'] <= 100
  assert evals[0]['eval_bleu'] < 1 < evals[-1]['eval_bleu']
  assert evals[-1]['eval_chrf'] > evals[0]['eval_chrf']
  samples = evaluate.read_samples(wd / 'samples' / 'step_100.txt')
  assert len(samples) == 16 and all(s.source and s.reference for s in samples)
  assert sorted(p.name for p in (wd / 'samples').iterdir()) == [
      'step_0.txt', 'step_100.txt', 'step_50.txt']
