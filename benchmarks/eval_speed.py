"""Eval time inside training on the tiny config: the evaluation before and after
packed eval rows and the faster decoder, side by side on the same weights.

    uv run python benchmarks/eval_speed.py [--steps 100] [--repeats 3]

Trains configs/tiny_cpu.py (8 faked CPU devices, mesh 2 x 4) for --steps steps
in this process, then times `evaluate.Evaluator` calls, interleaved, in two
set-ups over the same weights:

- before: eval rows padded one example per row; the decoder batched at the
  train batch size (16), one prompt length (config.data.max_len), the
  weights kept in their fsdp shardings (gathered at every token), as the
  Evaluator was before this change;
- after: the defaults (rows packed like training's; config.eval.decode_batch_size,
  prompt buckets, weights replicated once per eval).

Prints the median seconds of each part and checks both give the same loss
and BLEU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny_cpu  # noqa: E402  (the repository root, for configs/)
from mtnt_tpu import workdir as workdir_lib  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=100)
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  config = tiny_cpu.get_config()
  workdir_lib.use_cpu_devices(config)  # before JAX starts a backend
  import jax
  from mtnt_tpu import decode as decode_lib
  from mtnt_tpu import evaluate
  from mtnt_tpu import train
  from mtnt_tpu import state as state_lib
  from mtnt_tpu.data import pipeline

  run = train.build(config)
  compiled = train.compile_steps(run)
  train_step, eval_step = compiled.train, compiled.eval
  state = state_lib.init_state(run, jax.random.key(0))
  batches = iter(pipeline.train_dataset(config.data, config.tokenizer.path, run.local_batch,
                                        pipeline.HostShard.current()))
  for _ in range(args.steps):
    state, _ = train_step(state, pipeline.to_global(next(batches), run.batch_sharding), {})
  params = state.params

  with tempfile.TemporaryDirectory() as tmp:
    after = evaluate.Evaluator(run, eval_step, tmp)
    old_config = config.copy_and_resolve_references()
    old_config.data.packing = False
    before = evaluate.Evaluator(dataclasses.replace(run, config=old_config), eval_step, tmp)
    before._decoder = decode_lib.Decoder(
        run, run.tokenizer, batch_size=config.train.batch_size,
        max_prompt_len=config.data.max_len, max_decode_len=config.eval.max_decode_len,
        buckets=(config.data.max_len,), replicate_params=False)
    before._decoder.compile_for(before._prompts)
    times = {'before': [], 'after': []}
    for _ in range(args.repeats):
      for name, ev in (('before', before), ('after', after)):
        times[name].append(ev(params, args.steps))
  rows = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]}
          for name, ts in times.items()}
  b, a = rows['before'], rows['after']
  print(f'configs/tiny_cpu.py after {args.steps} steps, {len(after._sources)} eval sentences, '
        f'median of {args.repeats} interleaved evals; eval loss {a["eval_loss"]:.4f} '
        f'(before {b["eval_loss"]:.4f}), BLEU {a["eval_bleu"]:.2f} (before {b["eval_bleu"]:.2f})\n')
  print('| eval part | before (s) | after (s) | speed-up |')
  print('|---|---:|---:|---:|')
  for key, label in (('eval_loss_seconds', f'loss ({len(before._batches)} -> '
                                           f'{len(after._batches)} batches)'),
                     ('eval_decode_seconds', 'greedy decoding'), ('eval_seconds', 'whole eval')):
    print(f'| {label} | {b[key]:.2f} | {a[key]:.2f} | {b[key] / a[key]:.1f}x |')


if __name__ == '__main__':
  main()
