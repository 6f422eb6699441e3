"""The sharded KV-cache decoder, and BLEU/chrF in the training loop."""

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import beam as beam_lib
from mtnt_tpu import decode
from mtnt_tpu import evaluate
from mtnt_tpu import kv_cache
from mtnt_tpu import metrics
from mtnt_tpu import model as model_lib
from mtnt_tpu import sampling as sampling_lib
from mtnt_tpu import state as state_lib
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu import train
from mtnt_tpu import workdir as workdir_lib
from mtnt_tpu.data import pipeline
from mtnt_tpu.data import records
from tests import helpers
from tests import trained_run

pytestmark = pytest.mark.slow  # every test decodes with a model trained for it

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


def _greedy_without_cache(tr, prompts, stop_ids, model_config=None, params=None):
  """Reference: full forward pass over the unpadded sequence at every step, no cache."""
  model = model_lib.make_model(model_config or tr.setup.model_config)
  params = tr.params if params is None else params
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
    logits = np.asarray(forward(params, tokens, segments))
    for r in np.nonzero(~finished)[0]:
      nxt = int(np.argmax(logits[r, lengths[r] - 1]))
      out[r].append(nxt)
      tokens[r, lengths[r]] = nxt
      lengths[r] += 1
      finished[r] = nxt in stop_ids
    if finished.all():
      break
  return out


@pytest.mark.parametrize('replicate', [True, False])
@pytest.mark.parametrize('variant', ['tiny_gemma2', 'tiny_gemma3'])
def test_gemma2_and_3_decode_as_a_full_forward_pass(trained, prompts, variant, replicate):
  """Gemma 2 and 3 (sliding windows, soft-caps, qk-norm; Gemma 3's gating weights
  read by the token loop in the Gemma 1 layout), replicated or on the 2 x 4 mesh."""
  _, tr = trained
  c = tr.setup.config.copy_and_resolve_references()
  c.model.variant = variant
  setup = state_lib.setup(c, tr.setup.mesh, tr.setup.tokenizer)
  # Gemma 3 (and 2 9B/27B) store the gating weights transposed; Gemma 2 2B does not.
  assert setup.model_config.transpose_gating_einsum == (variant == 'tiny_gemma3')
  params = jax.device_put(model_lib.init_params(setup.model, jax.random.key(3)),
                          setup.params_shardings)
  d = decode.Decoder(setup, setup.tokenizer, batch_size=8, max_prompt_len=P,
                     max_decode_len=T, replicate_params=replicate)
  want = _greedy_without_cache(tr, prompts, d.stop_ids, setup.model_config, params)
  assert d.generate(params, prompts) == want


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
  greedy = sampling_lib.choose_tokens(logits, rng, sampling_lib.Sampling())
  assert greedy.tolist() == [1] * 4
  for s in (sampling_lib.Sampling(temperature=1.0, top_k=1), sampling_lib.Sampling(temperature=1.0,
                                                                       top_p=1e-3)):
    assert sampling_lib.choose_tokens(logits, rng, s).tolist() == [1] * 4
  top2 = sampling_lib.Sampling(temperature=5.0, top_k=2)
  seen = {int(t) for i in range(20)
          for t in sampling_lib.choose_tokens(logits, jax.random.fold_in(rng, i), top2)}
  assert seen == {1, 2}
  nucleus = sampling_lib.Sampling(temperature=1.0, top_p=0.7)  # {1: 0.47, 2: 0.43, ...}
  seen = {int(t) for i in range(20)
          for t in sampling_lib.choose_tokens(logits, jax.random.fold_in(rng, i), nucleus)}
  assert seen == {1, 2}
  with pytest.raises(ValueError, match='top_p'):
    sampling_lib.Sampling(top_p=0.0)


def test_training_logs_bleu_chrf_and_samples_at_every_eval(trained):
  wd, _ = trained
  evals = [r for r in metrics.read(wd) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 50, 100]
  for r in evals:
    assert 0 <= r['eval_bleu'] <= 100 and 0 <= r['eval_chrf'] <= 100
  assert evals[0]['eval_bleu'] < 1 < evals[-1]['eval_bleu']
  assert evals[-1]['eval_chrf'] > evals[0]['eval_chrf']
  samples = evaluate.read_samples(wd / 'samples' / 'step_100.txt')
  assert len(samples) == 16 and all(s.source and s.reference for s in samples)
  assert sorted(p.name for p in (wd / 'samples').iterdir()) == [
      'step_0.txt', 'step_100.txt', 'step_50.txt']


# --- speed: buckets, early stop, one gather per call --------------------------


def _loop_ops(hlo: str) -> str:
  """The text of every computation a while loop runs (bodies, conditions, and what they call)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  called = lambda text: set(re.findall(
      r'(?:condition|body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)', text))
  todo = set().union(*(called(l) for lines in comps.values() for l in lines if ' while(' in l))
  seen = set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo |= called('\n'.join(comps[c]))
  assert seen, 'the program has a while loop'
  return '\n'.join(l for c in seen for l in comps[c])


@pytest.mark.parametrize('beam_size', [1, 3])
def test_token_loop_reads_replicated_weights_without_gathers(trained, beam_size):
  _, tr = trained
  assert tr.setup.mesh.shape['fsdp'] == 8  # the weights train sharded over 8 devices
  loops = {}
  for replicate in (True, False):
    d = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P,
                       max_decode_len=T, beam_size=beam_size, replicate_params=replicate)
    loops[replicate] = _loop_ops(d.executable(d.buckets[0]).as_text())
  assert 'all-gather' not in loops[True]
  # The training shardings re-gather the weights at every token: what replication saves.
  assert 'all-gather' in loops[False]
  if beam_size == 1:  # nor do the loops of a batch that moves its last rows into 8
    d = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=32, max_prompt_len=P,
                       max_decode_len=T, compact=4)
    assert d.compact_to(32) == 8
    assert 'all-gather' not in _loop_ops(d.executable(d.buckets[0]).as_text())


@pytest.mark.parametrize('variant', ['tiny', 'tiny_gemma3'])
def test_token_loop_copies_no_weight(trained, variant):
  """On a CPU, XLA copies an einsum weight whose contracting axes are not where its
  matmul reads them at every token; the loop layout transposes each once per call."""
  _, tr = trained
  c = tr.setup.config.copy_and_resolve_references()
  c.model.variant = variant
  setup = state_lib.setup(c, tr.setup.mesh, tr.setup.tokenizer)
  sizes = {int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(
      setup.abstract_params) if 'einsum' in jax.tree_util.keystr(path)}
  copies = {}
  for laid_out in (True, False):
    d = decode.Decoder(setup, setup.tokenizer, batch_size=8, max_prompt_len=P,
                       max_decode_len=T, loop_layout=laid_out)
    loop = _loop_ops(d.executable(d.buckets[0]).as_text())
    copies[laid_out] = [
        m.group(0) for m in re.finditer(r'%[\w.\-]*copy[\w.\-]* = f32\[([\d,]+)\]', loop)
        if int(np.prod([int(n) for n in m.group(1).split(',')])) in sizes]
  assert not copies[True]
  assert copies[False], 'without it the loop copies weights (what the layout saves)'


def test_decoding_stops_when_every_row_has_ended(trained, decoder, prompts):
  _, tr = trained
  tokens, batches = decoder.generate_batches(tr.params, prompts)
  assert len(batches) == 2
  for batch in batches:
    # Each row's answer is its tokens and a stop token; none ran to T.
    assert max(len(t) for t in batch.tokens) + 1 == batch.steps < T


def test_prompts_compile_per_bucket_once(trained, prompts):
  _, tr = trained
  d = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P,
                     max_decode_len=T)
  assert d.buckets == (16, 32, P) and not d._compiled, 'compiled lazily'
  d.generate(tr.params, prompts)
  # Each batch (shortest prompts first) pads to the smallest bucket its longest prompt fits.
  want = {(d.bucket(max(len(prompts[i]) for i in rows)), 8) for rows in d.batch_order(prompts)}
  assert set(d._compiled) == want
  spent = d.compile_seconds
  d.generate(tr.params, prompts)
  d.translate(tr.params, ['The boys read the newspapers.'])
  assert d.compile_seconds == spent, 'buckets compiled once are reused'


def test_a_short_batch_runs_in_fewer_rows_and_rows_that_end_leave_the_loop(trained, prompts):
  """The 12 prompts as one batch of 32 rows: they run in 16 (batch_size / 2),
  and the loop moves to 8 rows once at most 8 are still going (compact=2)."""
  _, tr = trained
  plain = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=32, max_prompt_len=P,
                         max_decode_len=T, compact=1)
  d = decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=32, max_prompt_len=P,
                     max_decode_len=T, compact=2)
  assert d.row_counts == (8, 16, 32) and d.rows_for(12) == 16 and d.compact_to(16) == 8
  assert d.compact_to(8) == 0, '4 rows do not split over the 8 devices'
  got = d.generate(tr.params, prompts)
  assert got == plain.generate(tr.params, prompts)
  for g, w in zip(got, _greedy_without_cache(tr, prompts, d.stop_ids)):
    assert g == w[:-1] and w[-1] in d.stop_ids
  assert list(d._compiled) == list(plain._compiled) == [(d.bucket(max(map(len, prompts))), 16)]
  whiles = lambda dec: len(re.findall(r' while\(', next(iter(dec._compiled.values())).as_text()))
  assert whiles(d) == 3 and whiles(plain) == 2, 'the prefill, a loop over 16 rows, one over 8'
  # Sampled decoding keys each row by its place in the batch, so moving rows changes no draw.
  hot = sampling_lib.Sampling(temperature=3.0, seed=2)
  sampled = [decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=32, max_prompt_len=P,
                            max_decode_len=T, compact=c, sampling=hot).generate(tr.params, prompts)
             for c in (1, 2)]
  assert sampled[0] == sampled[1]


def test_translate_batches_sorts_within_a_window_and_keeps_input_order(trained, decoder):
  _, tr = trained
  sources = [p.src for p in evaluate.eval_pairs(tr.setup.config.data, 20)]
  sources[5] = ''
  windows = list(decoder.translate_batches(tr.params, sources, window=2))
  assert [len(w) for w in windows] == [16, 4]
  got = [t for w in windows for t in w]
  alone = [decoder.translate(tr.params, [s])[0] for s in sources]
  assert got == alone and got[5] == ''


# --- beam search ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _log_probs_fn(model_config):
  """log-probs [1, P + T, V] of an unpadded sequence (right padding masked), one compile."""
  model = model_lib.make_model(model_config)
  L = P + T
  return jax.jit(lambda params, ids: jax.nn.log_softmax(model_lib.forward(
      model, params, ids, jnp.arange(L)[None], (ids != tokenizer_lib.PAD).astype(jnp.int32))))


def _score(tr, prompt, answer, alpha):
  """Length-normalised log-probability of `answer` (stop token included) after `prompt`."""
  ids = np.zeros((1, P + T), np.int32)
  ids[0, :len(prompt) + len(answer)] = list(prompt) + list(answer)
  logp = np.asarray(_log_probs_fn(tr.setup.model_config)(tr.params, ids)[0])
  total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
  return float(beam_lib.length_normalized(total, len(answer), alpha))


def _beam_decoder(tr, beam_size, length_penalty=0.6):
  return decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P,
                        max_decode_len=T, beam_size=beam_size, length_penalty=length_penalty)


def test_beam_search_of_one_beam_is_greedy_decoding(trained, decoder, prompts):
  _, tr = trained
  beam = _beam_decoder(tr, 1)
  # beam_size=1 runs the plain loop: run beam search itself with one beam.
  fn = jax.jit(functools.partial(
      beam_lib.search, model=decoder.model,  # reads decoder.prepare's weights
      cache_constraint=lambda c: c, compute_dtype=jnp.float32, stop_ids=beam.stop_ids,
      max_decode_len=T, beam_size=1, length_penalty=0.6, mesh=None))
  greedy = decoder.generate(tr.params, prompts)
  rng = jax.random.key_data(jax.random.key(0))
  for start in (0, 8):
    chunk = prompts[start:start + 8]
    prompt_BP, length_B = decoder.layout(chunk)
    tokens_BT, _, _ = fn(decoder.prepare(tr.params), prompt_BP, length_B, rng)
    for r, want in enumerate(greedy[start:start + 8]):
      row = np.asarray(tokens_BT[r]).tolist()
      assert row[:len(want)] == want and row[len(want)] in decoder.stop_ids


def test_beam_search_decodes_each_sentence_the_same_alone_or_in_a_batch(trained, prompts):
  _, tr = trained
  beam = _beam_decoder(tr, 4)
  together = beam.generate(tr.params, prompts)
  alone = [beam.generate(tr.params, [p])[0] for p in prompts]
  assert together == alone and all(together)


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_search_never_scores_below_greedy(trained, decoder, prompts, alpha):
  _, tr = trained
  beam = _beam_decoder(tr, 4, alpha)
  got, batches = beam.generate_batches(tr.params, prompts)
  scores = dict(zip((i for b in beam.batch_order(prompts) for i in b),
                    (s for b in batches for s in b.scores)))
  greedy = _greedy_without_cache(tr, prompts, decoder.stop_ids)
  differ = 0
  for i, (p, g, b) in enumerate(zip(prompts, greedy, got)):
    # The beam's own score is the model's for its answer and some stop token.
    assert min(abs(_score(tr, p, b + [s], alpha) - scores[i]) for s in beam.stop_ids) < 1e-4
    assert scores[i] >= _score(tr, p, g, alpha) - 1e-5
    differ += b != g[:-1]
  assert differ, 'beam search found a better translation than greedy for some sentence'
  assert all(scores[i] > -np.inf for i in range(len(prompts)))


def test_bad_decoding_options_are_one_line_errors(trained):
  _, tr = trained
  with pytest.raises(ValueError, match='beam search is deterministic'):
    decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P, max_decode_len=T,
                   beam_size=2, sampling=sampling_lib.Sampling(temperature=1.0))
  with pytest.raises(ValueError, match='screen=True needs greedy decoding'):
    decode.Decoder(tr.setup, tr.setup.tokenizer, batch_size=8, max_prompt_len=P, max_decode_len=T,
                   screen=True, sampling=sampling_lib.Sampling(temperature=1.0))
  for field, value in (('beam_size', 0), ('decode_batch_size', 0), ('length_penalty', -1.0)):
    with pytest.raises(train.ConfigError, match=f'config.eval.{field}={value}'):
      train.build(helpers.tiny_config(**{f'eval.{field}': value}))


def test_translate_beam_size_flag_decodes_like_the_beam_decoder(trained):
  wd, tr = trained
  sources = [p.src for p in evaluate.eval_pairs(tr.setup.config.data, 6)]
  r = trained_run.run_module('translate', '--workdir', str(wd), '--beam_size', '3',
                             '--length_penalty', '0.0', '--max_prompt_len', str(P),
                             '--max_decode_len', str(T), stdin='\n'.join(sources) + '\n')
  assert r.returncode == 0, r.stderr[-3000:]
  beam = _beam_decoder(tr, 3, 0.0)
  assert r.stdout.splitlines() == beam.translate(tr.params, sources)
  r = trained_run.run_module('translate', '--workdir', str(wd), '--beam_size', '2',
                             '--temperature', '0.7', stdin='A cat.\n')
  assert r.returncode != 0 and 'beam search is deterministic' in r.stderr


@pytest.mark.parametrize('lengths', [(0, 1, 5, 13), (3, 32, 17, 0), (1, 0, 1, 1)])
def test_chunked_prefill_fills_the_cache_as_one_pass_does(lengths):
  """Chunks skip the slots that are padding in every row: (0, 1, 5, 13) fills
  two chunks, (3, 32, 17, 0) four with the first started at slot 0, and
  prompts of BOS alone none; the real slots hold what one pass over the whole
  bucket writes, and the next write goes to slot P - 1."""
  model = model_lib.make_model(model_lib.build_config('tiny', 1000))
  params = model_lib.init_params(model, jax.random.key(0))
  P, C = 32, 40
  length_B = jnp.asarray(lengths, jnp.int32)
  ids = np.random.default_rng(0).integers(3, 1000, size=(len(lengths), P))
  prompt_BP = jnp.asarray(np.where(np.arange(P)[None] >= P - np.asarray(lengths)[:, None], ids, 0),
                          jnp.int32)
  fill = lambda chunk: kv_cache.prefill(
      params, prompt_BP, length_B, model=model, C=C, compute_dtype=jnp.float32,
      cache_constraint=lambda cache: cache, chunk=chunk)
  (prompts, chunked), (_, whole) = fill(kv_cache.PREFILL_CHUNK), fill(P)
  real_BC1 = (np.asarray(prompts.real_BC) & (np.arange(C) < P - 1)[None])[:, :, None, None]
  for name in whole:
    for k in ('k', 'v'):
      np.testing.assert_allclose(np.where(real_BC1, chunked[name][k], 0),
                                 np.where(real_BC1, whole[name][k], 0), rtol=1e-5, atol=1e-6)
    assert (np.asarray(chunked[name]['end_index']) == P - 1).all()
