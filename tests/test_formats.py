"""Checkpoint formats: Kaggle, Hugging Face and GGUF in, Hugging Face and PEFT out.

Every checkpoint here is written by the test itself: a tiny model of each
Gemma generation, saved by gemma's saver (Kaggle), by formats.hf (safetensors)
and by the gguf package's own writer (GGUF, F32 and Q8_0).
"""

import json
import os

import flax
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from safetensors import numpy as safetensors_numpy

from mtnt_tpu import formats
from mtnt_tpu import lora as lora_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import sharding
from mtnt_tpu import state as state_lib
from mtnt_tpu.formats import hf
from mtnt_tpu.formats import kaggle
from mtnt_tpu.formats import layout
from mtnt_tpu.formats import peft
from tests import helpers

GENERATIONS = {'tiny': 1, 'tiny_gemma2': 2, 'tiny_gemma3': 3}
GGUF_ARCH = {1: 'gemma', 2: 'gemma2', 3: 'gemma3'}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
  """Rebuilt GGUF tokenizers go to the test's own dir, not ~/.cache."""
  monkeypatch.setattr(formats, 'CACHE_DIR', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def bpe_tokenizer(tmp_path_factory):
  """A SentencePiece BPE model trained like Gemma's (byte fallback, no dummy prefix)."""
  sample = os.path.join(helpers.ROOT, 'mtnt_tpu', 'data', 'sample', 'train.tsv')
  lines = [t for l in open(sample, encoding='utf-8') for t in l.rstrip('\n').split('\t')[1:]]
  prefix = str(tmp_path_factory.mktemp('spm') / 'bpe')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=prefix, model_type='bpe', vocab_size=512,
      byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True,
      normalization_rule_name='identity', pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      user_defined_symbols=['<start_of_turn>', '<end_of_turn>'], minloglevel=2)
  return prefix + '.model'


def _random_like(abstract, seed=1):
  """Host arrays of `abstract`'s shapes, drawn by numpy: no compile on a busy CPU.

  Norm scales get values too (gemma initialises them to zero), so a dropped
  (1 + w) or a swapped norm would show.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(a.dtype), abstract)


def _params(variant, vocab, seed=1):
  cfg = model_lib.build_config(variant, vocab)
  return cfg, _random_like(model_lib.abstract_params(model_lib.make_model(cfg)), seed)


def _target(cfg, dtype='float32'):
  """The abstract params in the tiny config's shardings (mesh data=2 x fsdp=4)."""
  abstract = model_lib.abstract_params(model_lib.make_model(cfg), dtype)
  mesh = sharding.make_mesh(2, 4)
  return state_lib.placed(abstract, mesh)


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def write_gguf(path, params, cfg, tokenizer, qtype=gguf.GGMLQuantizationType.F32):
  """A GGUF as llama.cpp writes Gemma: [out, in] rows, norms as 1 + w, tokenizer metadata."""
  gen = layout.generation(cfg)
  arch = GGUF_ARCH[gen]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_embedding_length(cfg.embed_dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  types = []
  for i in range(sp.get_piece_size()):
    types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 5 if sp.is_unused(i) else 1)
  user = {sp.piece_to_id('<start_of_turn>'), sp.piece_to_id('<end_of_turn>')}
  types = [3 if i in user else t for i, t in enumerate(types)]  # llama.cpp marks them CONTROL
  w.add_tokenizer_model('llama')
  w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
  w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(False)
  table = layout.NAMES[gen]
  flat = _flatten(params)
  for param, rule in layout.rules(cfg).items():
    for role, name, array in zip(rule.roles, rule.names(table, layout.GGUF),
                                 rule.to_sources(flat[param])):
      array = (array + 1 if layout.is_norm(role) else array).astype(np.float32)
      if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
      else:
        w.add_tensor(name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _flatten(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


@pytest.mark.parametrize('variant', sorted(GENERATIONS))
def test_hf_and_kaggle_load_the_same_params_bit_for_bit(variant, bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params(variant, vocab)
  kaggle.save(params, str(tmp_path / 'kaggle'))
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  hf.save(params, cfg, str(hf_dir), dtype='float32')
  assert json.loads((hf_dir / 'config.json').read_text())['model_type'] == (
      hf.MODEL_TYPES[GENERATIONS[variant]][0])
  from_kaggle = formats.load(str(tmp_path / 'kaggle'), _target(cfg), variant)
  from_hf = formats.load(str(hf_dir), _target(cfg), variant)
  _equal(from_kaggle, params)
  _equal(from_hf, params)
  emb = from_hf['embedder']['input_embedding']
  assert emb.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  # Each device holds a quarter of the rows: the shard it read, not the tensor.
  assert {s.data.shape for s in emb.addressable_shards} == {(vocab // 4, cfg.embed_dim)}


def test_gemma1_names_differ_from_gemma2s():
  """Gemma 1's post_attention_layernorm is the pre-feed-forward norm."""
  one, two = layout.NAMES[1], layout.NAMES[2]
  assert one['pre_ffw_norm'][layout.HF].endswith('post_attention_layernorm.weight')
  assert two['post_attention_norm'][layout.HF].endswith('post_attention_layernorm.weight')
  assert two['pre_ffw_norm'][layout.HF].endswith('pre_feedforward_layernorm.weight')
  assert 'query_norm' in layout.NAMES[3] and 'query_norm' not in two


def test_sharded_bf16_export_round_trips_exactly(bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params('tiny_gemma3', vocab)
  hf.save(params, cfg, str(tmp_path), shard_bytes=200_000)  # bf16 by default
  index = json.loads((tmp_path / hf.INDEX).read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  assert not (tmp_path / hf.SINGLE).exists()
  loaded = formats.load(str(tmp_path), _target(cfg, 'bfloat16'), 'tiny_gemma3')
  _equal(loaded, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
  # And the same bytes again when the loaded weights are exported.
  again = tmp_path / 'again'
  again.mkdir()
  hf.save(loaded, cfg, str(again), shard_bytes=200_000)
  for f in files:
    a = safetensors_numpy.load_file(str(tmp_path / f))
    b = safetensors_numpy.load_file(str(again / f))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['tiny', 'tiny_gemma3'])
def test_logits_are_equal_from_every_format(variant, bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params(variant, vocab)
  kaggle.save(params, str(tmp_path / 'kaggle'))
  (tmp_path / 'hf').mkdir()
  hf.save(params, cfg, str(tmp_path / 'hf'), dtype='float32')
  gguf_path = write_gguf(tmp_path / 'm.gguf', params, cfg, bpe_tokenizer)
  model = model_lib.make_model(cfg)
  x = jnp.asarray([[2, 17, 40, 99, 5, 300, 7, 8]])
  pos, seg = jnp.arange(8)[None], jnp.ones_like(x)
  forward = jax.jit(lambda params: model_lib.forward(model, params, x, pos, seg))
  logits = {fmt: np.asarray(forward(formats.load(p, _target(cfg), variant)))
            for fmt, p in (('kaggle', str(tmp_path / 'kaggle')), ('hf', str(tmp_path / 'hf')),
                           ('gguf', gguf_path))}
  np.testing.assert_array_equal(logits['kaggle'], logits['hf'])
  # GGUF stores norms as 1 + w in float32: w comes back within one rounding.
  np.testing.assert_allclose(logits['gguf'], logits['kaggle'], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('variant', sorted(GENERATIONS))
def test_quantised_gguf_loads_close_to_the_weights(variant, bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params(variant, vocab)
  path = write_gguf(tmp_path / 'q8.gguf', params, cfg, bpe_tokenizer,
                    gguf.GGMLQuantizationType.Q8_0)
  loaded = formats.load(path, _target(cfg), variant)
  for k, v in _flatten(loaded).items():
    want = _flatten(params)[k]
    # Q8_0: 8-bit per value with one scale per 32: about 1% of the row's range.
    np.testing.assert_allclose(np.asarray(v), want, atol=0.01 * np.abs(want).max() + 1e-6,
                               err_msg=k)
    assert not np.array_equal(np.asarray(v), want) or 'scale' in k  # really quantised


def test_tokenizer_rebuilt_from_gguf_encodes_like_the_original(bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params('tiny_gemma3', vocab)
  path = write_gguf(tmp_path / 'm.gguf', params, cfg, bpe_tokenizer)
  rebuilt_path = formats.tokenizer_path('', path)
  original = spm.SentencePieceProcessor(model_file=bpe_tokenizer)
  rebuilt = spm.SentencePieceProcessor(model_file=rebuilt_path)
  valid = os.path.join(helpers.ROOT, 'mtnt_tpu', 'data', 'sample', 'valid.tsv')
  lines = [t for l in open(valid, encoding='utf-8') for t in l.rstrip('\n').split('\t')[1:]]
  lines += ['<start_of_turn>user\nTranslate  this, 1234 times:\n', 'Ünïcødé ✓ 日本 \t end']
  for line in lines:
    assert rebuilt.encode(line) == original.encode(line), line
    assert rebuilt.decode(rebuilt.encode(line)) == line
  assert rebuilt.encode('<end_of_turn>') == [original.piece_to_id('<end_of_turn>')]
  assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id(), rebuilt.unk_id()) == (2, 1, 0, 3)
  before = os.path.getmtime(rebuilt_path)
  assert formats.tokenizer_path('', path) == rebuilt_path  # built once per file version
  assert os.path.getmtime(rebuilt_path) == before
  assert rebuilt_path.startswith(formats.CACHE_DIR)


# --- one line for each bad input, before any weights are read --------------------


def _one_line(excinfo, *needles):
  msg = str(excinfo.value)
  assert '\n' not in msg, msg
  for n in needles:
    assert n in msg, msg


def test_bad_inputs_stop_with_one_line(bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params('tiny_gemma3', vocab)
  good = tmp_path / 'hf'
  good.mkdir()
  hf.save(params, cfg, str(good), dtype='float32')
  tiny_cfg = model_lib.build_config('tiny', vocab)
  with pytest.raises(ValueError) as e:  # the wrong variant
    formats.load(str(good), _target(tiny_cfg), 'tiny')
  _one_line(e, "config.model.variant='tiny'", 'Gemma 1', 'Gemma 3', "'tiny_gemma3'")

  weights = safetensors_numpy.load_file(str(good / hf.SINGLE))
  name = 'model.layers.2.mlp.up_proj.weight'

  def broken(dirname, write):
    """`good`'s config.json beside a safetensors file that `write` makes; loaded."""
    d = tmp_path / dirname
    d.mkdir()
    (d / hf.CONFIG).write_text((good / hf.CONFIG).read_text())
    write(str(d / hf.SINGLE))
    with pytest.raises(ValueError) as e:
      formats.load(str(d), _target(cfg), 'tiny_gemma3')
    return e

  _one_line(broken('missing', lambda f: safetensors_numpy.save_file(
      {k: v for k, v in weights.items() if k != name}, f)), name, 'lacks')
  _one_line(broken('wrong', lambda f: safetensors_numpy.save_file(
      {**weights, name: weights[name][:, :-1].copy()}, f)), name, 'shape')
  data = (good / hf.SINGLE).read_bytes()
  _one_line(broken('cut', lambda f: open(f, 'wb').write(data[:len(data) // 2])), 'truncated')

  gguf_path = write_gguf(tmp_path / 'm.gguf', params, cfg, bpe_tokenizer)
  data = open(gguf_path, 'rb').read()
  cut_gguf = tmp_path / 'cut.gguf'
  cut_gguf.write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(ValueError) as e:
    formats.load(str(cut_gguf), _target(cfg), 'tiny_gemma3')
  _one_line(e, 'truncated')
  with pytest.raises(ValueError) as e:
    formats.load(gguf_path, _target(tiny_cfg), 'tiny')
  _one_line(e, "config.model.variant='tiny'", 'Gemma 3')

  with pytest.raises(FileNotFoundError) as e:
    formats.load(str(tmp_path / 'nowhere'), _target(cfg), 'tiny_gemma3')
  _one_line(e, 'does not exist', '.gguf')


# --- what transformers and peft read -------------------------------------------

# The keys transformers' GemmaConfig, Gemma2Config and Gemma3TextConfig take
# (their documented __init__ arguments), beside model_type and architectures.
TRANSFORMERS_KEYS = {
    1: {'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
        'num_attention_heads', 'num_key_value_heads', 'head_dim', 'hidden_act',
        'hidden_activation', 'max_position_embeddings', 'initializer_range', 'rms_norm_eps',
        'use_cache', 'pad_token_id', 'eos_token_id', 'bos_token_id', 'tie_word_embeddings',
        'rope_theta', 'attention_bias', 'attention_dropout'},
}
TRANSFORMERS_KEYS[2] = TRANSFORMERS_KEYS[1] | {
    'query_pre_attn_scalar', 'sliding_window', 'final_logit_softcapping',
    'attn_logit_softcapping', 'cache_implementation', 'layer_types'}
TRANSFORMERS_KEYS[3] = TRANSFORMERS_KEYS[2] | {'rope_local_base_freq', 'rope_scaling'}
ARCHITECTURES = {1: ('gemma', 'GemmaForCausalLM'), 2: ('gemma2', 'Gemma2ForCausalLM'),
                 3: ('gemma3_text', 'Gemma3ForCausalLM')}


@pytest.mark.parametrize('variant', ['gemma_2b', 'gemma2_2b', 'gemma3_270m', 'gemma3_1b'])
def test_hf_config_has_the_keys_transformers_reads(variant):
  cfg = model_lib.build_config(variant, 1000)
  gen = layout.generation(cfg)
  c = hf.config_json(cfg, 'bfloat16')
  assert (c['model_type'], c['architectures']) == (ARCHITECTURES[gen][0], [ARCHITECTURES[gen][1]])
  assert TRANSFORMERS_KEYS[gen] <= set(c), TRANSFORMERS_KEYS[gen] - set(c)
  assert c['head_dim'] * c['num_attention_heads'] == cfg.num_heads * cfg.head_dim
  if gen >= 2:
    assert c['query_pre_attn_scalar'] ** -0.5 == pytest.approx(cfg.query_pre_attn_scalar())
    # transformers 5's config dataclass rejects 256.0 ("expected int"): found by
    # benchmarks/transformers_check.py loading an export.
    assert isinstance(c['query_pre_attn_scalar'], int)
    assert len(c['layer_types']) == cfg.num_layers
  if variant == 'gemma3_270m':  # the published google/gemma-3-270m config.json's values
    assert (c['hidden_size'], c['intermediate_size'], c['num_hidden_layers'],
            c['num_attention_heads'], c['num_key_value_heads'], c['head_dim'],
            c['query_pre_attn_scalar'], c['sliding_window'], c['rope_theta'],
            c['rope_local_base_freq'], c['layer_types'][5]) == (
                640, 2048, 18, 4, 1, 256, 256, 512, 1_000_000, 10_000, 'full_attention')


def test_peft_adapter_adds_what_the_lora_fold_adds(bpe_tokenizer, tmp_path):
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg = model_lib.build_config('tiny', vocab)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets='both')
  lora_model = lora_lib.LoraModel(model_lib.make_model(cfg), spec)
  x = jnp.zeros((1, 4), jnp.int32)
  full = jax.eval_shape(lambda: lora_model.init(jax.random.key(0), x, x, None,
                                                jnp.ones((1, 4, 4), bool))['params'])
  # B nonzero (training starts it at zero), so the adapters change something.
  base, adapters = lora_lib.split(_random_like(full))
  peft.save(adapters, cfg, str(tmp_path), rank=4, alpha=8.0, base_model='google/gemma-2b')
  config = json.loads((tmp_path / peft.CONFIG).read_text())
  assert config['peft_type'] == 'LORA' and config['r'] == 4 and config['lora_alpha'] == 8.0
  assert sorted(config['target_modules']) == sorted(
      ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
  assert config['base_model_name_or_path'] == 'google/gemma-2b'
  ad = safetensors_numpy.load_file(str(tmp_path / peft.WEIGHTS))
  folded = lora_lib.fold(base, adapters, spec, cfg.transpose_gating_einsum)
  base_hf = dict(hf.tensors(base, cfg, np.float32))
  folded_hf = dict(hf.tensors(folded, cfg, np.float32))
  n = 0
  for name, w in base_hf.items():
    module = name[:-len('.weight')]
    key = f'base_model.model.{module}.lora_A.weight'
    if key not in ad:
      continue
    a, b = ad[key], ad[f'base_model.model.{module}.lora_B.weight']
    assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
    np.testing.assert_allclose(w + (8.0 / 4) * b @ a, folded_hf[name], rtol=1e-5, atol=1e-6)
    n += 1
  assert n == 7 * cfg.num_layers


def test_convert_writes_a_kaggle_checkpoint_and_tokenizer(bpe_tokenizer, tmp_path):
  from mtnt_tpu import convert
  vocab = spm.SentencePieceProcessor(model_file=bpe_tokenizer).get_piece_size()
  cfg, params = _params('tiny_gemma3', vocab)
  gguf_path = write_gguf(tmp_path / 'm.gguf', params, cfg, bpe_tokenizer,
                         gguf.GGMLQuantizationType.Q8_0)
  path = convert.convert(gguf_path, 'tiny_gemma3', str(tmp_path / 'out'))
  assert path == str(tmp_path / 'out' / 'tiny_gemma3')
  assert formats.tokenizer_path('', path) == str(tmp_path / 'out' / 'tokenizer.model')
  _equal(formats.load(path, _target(cfg), 'tiny_gemma3'),
         formats.load(gguf_path, _target(cfg), 'tiny_gemma3'))
  with pytest.raises(FileExistsError, match='already exists'):
    convert.convert(gguf_path, 'tiny_gemma3', str(tmp_path / 'out'))
