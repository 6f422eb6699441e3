"""Input-pipeline benchmark: mtnt_tpu's Grain pipeline next to the seed tutorial's tf.data one.

    uv run python benchmarks/pipeline.py [--repeats 3] [--batches 200] [--skip_tf]
        [--baseline REV] [--bestfit_bins 32,1024]

Both pipelines read the same real en-fr text (Multi30k train, 29,000 pairs, from
../shared/data/multi30k) with the same SentencePiece tokenizer, trained here on
that text with Gemma's special ids (pad 0, eos 1, bos 2, unk 3). Every batch
has the same number of rows (--batch_size, 32). Measured side by side in one
run, interleaved, --repeats times; the table gives the median.

  seed tf.data   the Gemma-on-MTNT Colab's pipeline, reproduced: tf.data over
                 (src, dst) strings, tokenized one example at a time in Python
                 via tf.numpy_function, every example longer than 25 tokens
                 dropped, the rest padded to 25, shuffle(10k), batch, repeat,
                 `.as_numpy_iterator()`. It runs in a throwaway virtualenv with
                 tensorflow-cpu (--tf_venv, created on first use), as a
                 subprocess that prints JSON: the project's env never gets
                 TensorFlow.
  mtnt_tpu       `pipeline.train_dataset` at max_len 128, packed and padded,
                 with config.data.num_workers 0 and 2.

Columns: examples/s (mtnt_tpu: over --batches batches after the first, whose
latency is reported apart; seed: over whole epochs from the start, since each
epoch's first batch waits for that epoch to be tokenized), the
non-pad fraction (non-pad tokens / rows x row length), and the fraction of
the epoch's examples the pipeline keeps, examples per CPU-second of this
process (all its threads: the fair rate on a shared machine, where wall time
waits for other jobs), and whether a fresh iterator given a saved state yields
the same next batches. --baseline REV times the packed pipeline as committed
at REV beside today's; --bestfit_bins N,.. times Grain's BestFitPackIterDataset
on the same read-and-tokenize stream. Before timing, a correctness pass
walks the mtnt_tpu pipeline 5% into its second epoch, checks that every record
index was seen, and checks every row against its record re-tokenized on its own.

--profile times each stage of the packed num_workers=0 pipeline without a
profiler, then runs cProfile (CPU time) in every thread (Grain tokenizes in its
read threads) and prints where the time goes.

If ../shared/data is absent the script says so and exits 0.
"""

# Only the standard library at the top: the same file runs in the tf.data venv
# (--_seed_worker), which has TensorFlow, numpy and sentencepiece and nothing else.
import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, '..', 'shared', 'data', 'multi30k')
DEFAULT_TF_VENV = os.path.join(tempfile.gettempdir(), 'mtnt_tpu_tfbench')
TF_PACKAGES = ('tensorflow-cpu', 'sentencepiece', 'numpy')

PAD, EOS, BOS = 0, 1, 2
SEED_MAX_LEN = 25  # the tutorial's max_seq_len
SEED_SHUFFLE_BUFFER = 10_000
VOCAB_SIZE = 8000


# ------------------------------------------------------------- seed (tf.data)


def seed_worker(args: argparse.Namespace) -> None:
  """Runs in the tf venv: one measurement of the seed pipeline, JSON on stdout."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import numpy as np
  import sentencepiece as spm
  import tensorflow as tf

  sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
  with open(args.pairs, encoding='utf-8') as f:
    pairs = [json.loads(line) for line in f]
  L = args.max_len

  # The tutorial's tokenizer wrapper: SentencePiece in Python, one string at a
  # time, called from the graph through tf.numpy_function.
  def tokenize_source(text):
    ids = [BOS] + sp.encode(args.prompt.replace('{src}', text.decode('utf-8')))
    return np.asarray(ids, np.int32)

  def tokenize_destination(text):
    return np.asarray(sp.encode(text.decode('utf-8')) + [EOS], np.int32)

  def tokenize(src, dst):
    s = tf.numpy_function(tokenize_source, [src], tf.int32)
    d = tf.numpy_function(tokenize_destination, [dst], tf.int32)
    s.set_shape([None])
    d.set_shape([None])
    return s, d

  def pad(x, value):
    return tf.pad(x, [[0, tf.maximum(L - tf.shape(x)[0], 0)]], constant_values=value)

  def to_training_input(src_tokens, dst_tokens):
    tokens = tf.concat([src_tokens, dst_tokens], axis=0)
    mask = tf.concat([tf.zeros_like(src_tokens, tf.bool), tf.ones_like(dst_tokens, tf.bool)], 0)
    return {'input_tokens': pad(tokens, PAD), 'target_mask': pad(mask, False)}

  def examples():
    ds = tf.data.Dataset.from_tensor_slices(([p['src'] for p in pairs],
                                             [p['dst'] for p in pairs]))
    ds = ds.map(tokenize)
    ds = ds.map(to_training_input)
    return ds.filter(lambda x: tf.shape(x['input_tokens'])[0] <= L)

  out = {'tensorflow': tf.__version__, 'total': len(pairs)}
  # One untimed pass over an epoch, unless an earlier run passed the count.
  kept = args.kept or int(examples().reduce(0, lambda n, _: n + 1).numpy())
  out['kept'] = kept
  per_epoch = kept // args.batch_size
  if per_epoch == 0:
    raise SystemExit(f'seed: only {kept} examples of {len(pairs)} fit {L} tokens, fewer '
                     f'than one batch of {args.batch_size}')

  # shuffle, batch, repeat. (repeat before batch changes only the first batch's
  # latency: tf.data then fuses shuffle+repeat and fills the 10k buffer across
  # epochs; the steady rate is the same.)
  ds = examples().shuffle(SEED_SHUFFLE_BUFFER)
  ds = ds.batch(args.batch_size, drop_remainder=True).repeat()
  # Its work is not spread evenly over batches: each epoch's first batch waits
  # for the whole epoch to be tokenized (the shuffle buffer holds more than the
  # kept examples), the rest of that epoch comes from the buffer. So it is
  # timed over whole epochs, first batch included, at least --batches batches.
  epochs = -(-args.batches // per_epoch)
  t0 = time.perf_counter()
  it = ds.as_numpy_iterator()
  batches = [next(it)]
  t1 = time.perf_counter()
  batches += [next(it) for _ in range(epochs * per_epoch - 1)]
  t2 = time.perf_counter()
  tokens = np.stack([b['input_tokens'] for b in batches])
  assert tokens.shape[1:] == (args.batch_size, L), tokens.shape
  rows = int(tokens.shape[0] * tokens.shape[1])  # every row is one example
  out.update(first_batch_s=t1 - t0, seconds=t2 - t0, examples=rows, rows=rows, row_len=L,
             non_pad=int((tokens != PAD).sum()), epochs=epochs, batches=len(batches))
  print(json.dumps(out))


def ensure_tf_venv(path: str) -> str:
  """Creates the throwaway tf.data venv if missing; returns its python."""
  python = os.path.join(path, 'bin', 'python')
  if os.path.exists(python):
    ok = subprocess.run([python, '-c', 'import tensorflow, sentencepiece, numpy'],
                        capture_output=True, env=_quiet_tf_env())
    if ok.returncode == 0:
      return python
  print(f'creating the tf.data venv {path} (pip install {" ".join(TF_PACKAGES)}) ...',
        flush=True)
  base = getattr(sys, '_base_executable', sys.executable)
  subprocess.run([base, '-m', 'venv', '--clear', path], check=True)
  subprocess.run([python, '-m', 'pip', 'install', '-q', *TF_PACKAGES], check=True)
  return python


def _quiet_tf_env() -> dict:
  # The project venv's variables must not leak into the tf venv's interpreter.
  env = {k: v for k, v in os.environ.items() if k not in ('VIRTUAL_ENV', 'PYTHONPATH')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def run_seed(python: str, work: str, args: argparse.Namespace, kept: int | None) -> dict:
  from mtnt_tpu import tokenizer
  cmd = [python, os.path.abspath(__file__), '--_seed_worker',
         '--prompt', tokenizer.prompt_text('{src}'),
         '--pairs', os.path.join(work, 'train_pairs.jsonl'),
         '--tokenizer', os.path.join(work, 'tokenizer.model'),
         '--batches', str(args.batches), '--batch_size', str(args.batch_size),
         '--max_len', str(SEED_MAX_LEN)] + (['--kept', str(kept)] if kept else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_quiet_tf_env())
  if proc.returncode != 0:
    raise RuntimeError(f'seed tf.data worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------- setup


def prepare_data(data_dir: str, work: str) -> str:
  from mtnt_tpu.data import prepare
  from mtnt_tpu.data import readers
  out = os.path.join(work, 'data')
  inputs = {
      'train': readers.AlignedSource(os.path.join(data_dir, 'train.en'),
                                     os.path.join(data_dir, 'train.fr')),
      'valid': readers.AlignedSource(os.path.join(data_dir, 'val.en'),
                                     os.path.join(data_dir, 'val.fr')),
  }
  stats = prepare.prepare(inputs, out)
  print(prepare.format_summary(stats, out), flush=True)
  return out


def train_tokenizer(pairs, path: str) -> None:
  """SentencePiece BPE on the train text, set up like the bundled sample's."""
  from mtnt_tpu import tokenizer
  with open(path, 'wb') as f:
    f.write(tokenizer.train_model((s for p in pairs for s in (p.src, p.dst)), VOCAB_SIZE,
                                  num_threads=os.cpu_count() or 1))


def data_config(data_dir: str, *, packing: bool, num_workers: int, max_len: int):
  from configs import common
  c = common.get_config().data
  c.dir = data_dir
  c.packing = packing
  c.num_workers = num_workers
  c.max_len = max_len
  return c


# ------------------------------------------------------------- mtnt_tpu pipeline


def make_dataset(variant: str, cfg, tok_path: str, batch_size: int):
  """The pipeline under test: 'mtnt_tpu' (pipeline.train_dataset) or
  'bestfit:N', the same shuffled read-and-tokenize stream packed by Grain's
  BestFitPackIterDataset with N bins instead of the project's window packer."""
  from mtnt_tpu.data import pipeline
  if variant == 'mtnt_tpu':
    return pipeline.train_dataset(cfg, tok_path, batch_size, pipeline.HostShard(0, 1))
  import grain
  bins = int(variant.split(':')[1])
  L = cfg.max_len
  paths = pipeline.split_paths(cfg.dir, cfg.train_split)
  n = len(grain.sources.ArrayRecordDataSource(paths))
  ds = grain.MapDataset.range(n).shuffle(seed=cfg.shuffle_seed).repeat(None)
  ds = ds.batch(pipeline.PACK_WINDOW, batch_fn=list).map(
      pipeline._ReadWindow(paths, tok_path, cfg.dst_lang, L))  # pylint: disable=protected-access
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  keys = ('inputs', 'targets', 'mask', 'index')

  class Examples(grain.experimental.FlatMapTransform):  # windows -> examples
    max_fan_out = pipeline.PACK_WINDOW

    def flat_map(self, window):
      return [{k: ex[k] for k in keys} for ex in window]

  it = grain.experimental.FlatMapIterDataset(it, Examples())
  it = grain.experimental.BestFitPackIterDataset(
      it, length_struct={k: L for k in keys}, num_packing_bins=bins, shuffle_bins=False,
      padding_struct={'inputs': 0, 'targets': 0, 'mask': 0, 'index': -1})
  it = it.map(lambda r: {'inputs': r['inputs'], 'targets': r['targets'], 'mask': r['mask'],
                         'index': r['index'], 'segment_ids': r['inputs_segment_ids'],
                         'positions': r['inputs_positions']})
  it = it.batch(batch_size, drop_remainder=True)
  return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)


def measure_project(data_dir: str, tok_path: str, *, packing: bool, num_workers: int,
                    max_len: int, batch_size: int, batches: int,
                    variant: str = 'mtnt_tpu') -> dict:
  import numpy as np
  cfg = data_config(data_dir, packing=packing, num_workers=num_workers, max_len=max_len)
  ds = make_dataset(variant, cfg, tok_path, batch_size)
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  t1, c1 = time.perf_counter(), time.process_time()
  got = [next(it) for _ in range(batches)]
  t2, c2 = time.perf_counter(), time.process_time()
  _close(it)
  idx = np.stack([b['index'] for b in got])
  seg = np.stack([b['segment_ids'] for b in got])
  assert idx.shape == (batches, batch_size, max_len), idx.shape
  examples = sum(np.unique(b[b >= 0]).size for b in idx)  # distinct records per batch
  segments = sum(len(set(r[r > 0].tolist())) for b in seg for r in b)
  return {'first_batch_s': t1 - t0, 'seconds': t2 - t1, 'cpu_seconds': c2 - c1,
          'examples': int(examples), 'segments': int(segments), 'rows': batches * batch_size,
          'row_len': max_len, 'non_pad': int((seg > 0).sum()),
          'resumes_exactly': resumes_exactly(ds)}


def resumes_exactly(ds, before: int = 3, after: int = 4) -> bool:
  """A fresh iterator given the state after `before` batches yields the same next ones."""
  import numpy as np
  it = iter(ds)
  for _ in range(before):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(after)]
  _close(it)
  it = iter(ds)
  it.set_state(state)
  got = [next(it) for _ in range(after)]
  _close(it)
  return all(set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
             for a, b in zip(want, got))


def measure_baseline(rev: str, work: str, args_json: str) -> dict:
  """measure_project on the pipeline as committed at `rev`, in a subprocess
  importing that revision's tree (git archive) instead of this one."""
  tree = os.path.join(work, f'baseline-{rev}')
  if not os.path.isdir(tree):
    os.makedirs(tree)
    archive = subprocess.run(['git', '-C', REPO, 'archive', rev], check=True,
                             capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', tree], input=archive, check=True)
  out = subprocess.run([sys.executable, os.path.abspath(__file__), '--_project_worker',
                        '--project_root', tree, '--worker_args', args_json],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def project_worker(args: argparse.Namespace) -> None:
  sys.path.insert(0, args.project_root)  # that revision's mtnt_tpu and configs
  from absl import flags
  flags.FLAGS([sys.argv[0]])
  kw = json.loads(args.worker_args)
  from mtnt_tpu.data import pipeline
  print(f'baseline pipeline: {pipeline.__file__}', file=sys.stderr)
  print(json.dumps(measure_project(**kw)))


def _segments(batch: dict) -> int:
  """Examples in a batch of rows: where a nonzero segment id starts."""
  import numpy as np
  seg = batch['segment_ids']
  return int(((np.diff(seg, axis=-1, prepend=0) != 0) & (seg > 0)).sum())


def _close(it) -> None:
  close = getattr(it, 'close', None)
  if close is not None:
    close()


def check_epoch(data_dir: str, tok_path: str, *, packing: bool, num_workers: int,
                max_len: int, batch_size: int) -> dict:
  """Walks the pipeline past one epoch, until every record index has been seen.

  Each segment must be exactly its record tokenized on its own (truncated at
  max_len), with positions 0.. and one index in [0, records); pad must carry
  index -1. The walk goes 5% into the second epoch, where an index that is not
  reduced modulo the split size (Grain's map_with_index after repeat counts
  on) would show.
  """
  import numpy as np
  from mtnt_tpu import tokenizer as tokenizer_lib
  from mtnt_tpu.data import pipeline
  cfg = data_config(data_dir, packing=packing, num_workers=num_workers, max_len=max_len)
  src = pipeline.source(data_dir, cfg.train_split)
  n = len(src)
  tok = tokenizer_lib.Tokenizer(tok_path)
  expected = {}
  ds = pipeline.train_dataset(cfg, tok_path, batch_size, pipeline.HostShard(0, 1))
  it = iter(ds)
  seen = set()
  consumed = 0
  seen_at_one_epoch = consumed_to_see_all = None
  errors = collections.Counter()
  repeats_before_all = 0
  while (len(seen) < n or consumed < n + n // 20) and consumed < 2 * n:
    b = next(it)
    for r in range(batch_size):
      sid, index = b['segment_ids'][r], b['index'][r]
      if ((sid == 0) != (index < 0)).any():
        errors['pad_and_index_disagree'] += 1
      for s in np.unique(sid[sid > 0]):
        at = np.flatnonzero(sid == s)
        ids = np.unique(index[at])
        if len(ids) != 1:
          errors['segment_with_several_indices'] += 1
          continue
        i = int(ids[0])
        if not 0 <= i < n:
          errors['index_out_of_range'] += 1
          i %= n
        if i not in expected:
          expected[i] = pipeline.tokenize_example(tok, i, src[i], cfg.dst_lang, max_len)
        ex = expected[i]
        if (len(at) != len(ex.inputs) or at[-1] - at[0] + 1 != len(at) or
            not np.array_equal(b['inputs'][r, at], ex.inputs) or
            not np.array_equal(b['targets'][r, at], ex.targets) or
            not np.array_equal(b['mask'][r, at], ex.mask) or
            not np.array_equal(b['positions'][r, at], np.arange(len(at)))):
          errors['segment_differs_from_its_record'] += 1
        if i in seen and len(seen) < n:
          repeats_before_all += 1
        seen.add(i)
        consumed += 1
        if len(seen) == n and consumed_to_see_all is None:
          consumed_to_see_all = consumed
        if consumed == n:
          seen_at_one_epoch = len(seen)
  _close(it)
  lengths = np.array([len(tokenize_full(tok, src[i], cfg.dst_lang)) for i in range(n)])
  return {'records': n, 'seen': len(seen), 'consumed_to_see_all': consumed_to_see_all,
          'consumed': consumed,
          'seen_after_one_epoch_of_examples': seen_at_one_epoch,
          'repeats_before_all_seen': repeats_before_all,
          'truncated': int((lengths - 1 > max_len).sum()), 'errors': dict(errors),
          'lengths': lengths}


def tokenize_full(tok, record: bytes, dst_lang: str) -> list:
  from mtnt_tpu.data import records
  pair = records.decode(record)
  prompt, target = tok.encode_example(pair.src, pair.dst, dst_lang)
  return prompt + target


# ------------------------------------------------------------- profile


def profile_project(data_dir: str, tok_path: str, *, max_len: int, batch_size: int,
                    batches: int, top: int = 30) -> None:
  """cProfile of the packed num_workers=0 pipeline: CPU time, every thread, merged.

  Grain tokenizes in its read threads and batches in a prefetch thread, so a
  profile of the main thread alone sees only waiting. Each thread gets its own
  profiler timed by time.thread_time (CPU, not wall: a thread waiting for the
  GIL or a queue costs nothing), and the profiles are added up.
  """
  import cProfile
  import pstats
  import threading
  profiles = []
  lock = threading.Lock()
  run = threading.Thread.run

  def profiled_run(self):
    prof = cProfile.Profile(time.thread_time)
    with lock:
      profiles.append((self.name, prof))
    prof.runcall(run, self)

  threading.Thread.run = profiled_run
  try:
    main_prof = cProfile.Profile(time.thread_time)
    t0, c0 = time.perf_counter(), time.process_time()
    r = main_prof.runcall(measure_project, data_dir, tok_path, packing=True, num_workers=0,
                          max_len=max_len, batch_size=batch_size, batches=batches)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  finally:
    threading.Thread.run = run
  time.sleep(1)  # the pipeline's threads finish their last element and exit
  print(f'\n## cProfile: packed {max_len}, num_workers=0, {batches} batches, '
        f'{r["examples"]} examples: {wall:.1f}s wall, {cpu:.1f}s CPU '
        f'({cpu / r["examples"] * 1e6:.0f} us CPU per example, profiler included)\n')
  stats = pstats.Stats(main_prof)
  for _, prof in profiles:
    try:
      stats.add(prof)
    except TypeError:  # a thread that never ran any Python
      pass
  stats.sort_stats('tottime').print_stats(top)
  stats.sort_stats('cumulative').print_stats(top)


def stage_costs(data_dir: str, tok_path: str, *, max_len: int, batch_size: int,
                n: int = 3000, rounds: int = 3) -> list:
  """Wall microseconds per example of each stage, single-threaded, no profiler.

  cProfile inflates cheap Python calls, so its shares are checked against this.
  Only public pieces are used (pipeline.source, tokenize_example, records,
  Grain's own API): A-C rebuild the read-and-tokenize part of a Grain
  pipeline, D is `pipeline.train_dataset` as it is, so D - C is what its
  packing, batching and read-ahead cost. Best of `rounds`, n records each.
  """
  import grain
  import numpy as np
  from array_record.python import array_record_module
  from mtnt_tpu import tokenizer as tokenizer_lib
  from mtnt_tpu.data import pipeline, records
  cfg = data_config(data_dir, packing=True, num_workers=0, max_len=max_len)
  paths = pipeline.split_paths(data_dir, cfg.train_split)
  src = pipeline.source(data_dir, cfg.train_split)
  keys = np.random.default_rng(0).permutation(len(src))[:n].tolist()
  out = []

  def timed(name, fn):
    best = float('inf')
    for _ in range(rounds):  # the best of a few: the machine is shared and noisy
      t = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t)
    out.append((name, best / n * 1e6))

  raw = [src[i] for i in keys[:100]]  # warm the reader
  timed('ArrayRecordDataSource[i] (reader.read([i]), as Grain reads)',
        lambda: [src[i] for i in keys])
  reader = array_record_module.ArrayRecordReader(paths[0], 'readahead_buffer_size:0')
  timed('  the same record by range: reader.read(i, i + 1)',
        lambda: [reader.read(i, i + 1) for i in keys])
  reader.close()
  raw = [src[i] for i in keys]
  tok = tokenizer_lib.Tokenizer(tok_path)
  timed('records.decode (JSON)', lambda: [records.decode(r) for r in raw])
  pairs = [records.decode(r) for r in raw]
  timed('Tokenizer.encode_example (SentencePiece)',
        lambda: [tok.encode_example(p.src, p.dst, cfg.dst_lang) for p in pairs])
  timed('pipeline.tokenize_example (decode + encode + arrays)',
        lambda: [pipeline.tokenize_example(tok, 0, r, cfg.dst_lang, max_len) for r in raw])

  size = len(src)
  ds = src.map_with_index(lambda i, r: (i % size, r)).shuffle(seed=0).repeat(None)
  timed('A  Grain MapDataset: index, shuffle, repeat, read', lambda: [ds[i] for i in range(n)])
  ds = ds.map(lambda x: pipeline.tokenize_example(tok, x[0], x[1], cfg.dst_lang, max_len))
  timed('B  A + tokenize_example map', lambda: [ds[i] for i in range(n)])

  def take(it, count_examples):
    seen = 0
    while seen < n:
      seen += count_examples(next(it))

  no_threads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  timed('C  B as IterDataset, no read threads',
        lambda: take(iter(ds.to_iter_dataset(no_threads)), lambda x: 1))
  full = iter(pipeline.train_dataset(cfg, tok_path, batch_size, pipeline.HostShard(0, 1)))
  next(full)  # past its start-up
  timed('D  pipeline.train_dataset, packed, num_workers=0, as it is',
        lambda: take(full, _segments))
  _close(full)
  return out


# ------------------------------------------------------------- report


def _median(xs):
  return statistics.median(xs) if xs else float('nan')


def summarize(name: str, runs: list, kept: float, note: str = '') -> dict:
  eps = [r['examples'] / r['seconds'] for r in runs]
  return {'pipeline': name, 'examples_per_s': _median(eps), 'min': min(eps), 'max': max(eps),
          'records_per_s': _median(eps) / kept,
          'non_pad': _median([r['non_pad'] / (r['rows'] * r['row_len']) for r in runs]),
          'examples_per_row': _median([r['examples'] / r['rows'] for r in runs]),
          'first_batch_s': _median([r['first_batch_s'] for r in runs]), 'kept': kept,
          'per_cpu_s': _median([r['examples'] / r['cpu_seconds'] if r.get('cpu_seconds')
                                else float('nan') for r in runs]),
          'resumes': ('n/a' if any('resumes_exactly' not in r for r in runs) else
                      'yes' if all(r['resumes_exactly'] for r in runs) else 'NO'),
          'note': note}


def _pct(x: float) -> str:
  return 'not checked' if x != x else f'{x:.1%}'


def _num(x: float) -> str:
  return 'n/a' if x != x else f'{x:,.0f}'


def label(variant: str, packing: bool, workers: int, args: argparse.Namespace) -> str:
  if variant == 'baseline':
    return f'mtnt_tpu at {args.baseline} packed {args.max_len}, num_workers={workers}'
  if variant.startswith('bestfit:'):
    return (f"Grain BestFitPackIterDataset, {variant.split(':')[1]} bins, {args.max_len}, "
            f'num_workers={workers}')
  return f'mtnt_tpu {"packed" if packing else "padded"} {args.max_len}, num_workers={workers}'


def table(rows: list, base: float | None, base_name: str = 'seed') -> str:
  out = [f'| pipeline | examples/s (median; min-max) | vs {base_name} | non-pad fraction | '
         'examples/row | kept per epoch | records tokenized/s | first batch (s) | '
         'examples per CPU-second | exact resume |',
         '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    ratio = f'{r["examples_per_s"] / base:.1f}x' if base else 'n/a'
    out.append(f'| {r["pipeline"]} | {r["examples_per_s"]:,.0f} ({r["min"]:,.0f}-'
               f'{r["max"]:,.0f}) | {ratio} | {r["non_pad"]:.3f} | {r["examples_per_row"]:.2f} '
               f'| {_pct(r["kept"])}{r["note"]} | {_num(r["records_per_s"])} '
               f'| {r["first_batch_s"]:.2f} | {_num(r["per_cpu_s"])} | {r["resumes"]} |')
  return '\n'.join(out)


# ------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--repeats', type=int, default=3, help='measurements per pipeline (median)')
  p.add_argument('--batches', type=int, default=200,
                 help='timed batches per measurement, after the first; the seed rounds up to '
                 'whole epochs (default %(default)s)')
  p.add_argument('--batch_size', type=int, default=32, help='rows per batch, all pipelines')
  p.add_argument('--max_len', type=int, default=128, help='mtnt_tpu row length')
  p.add_argument('--skip_tf', action='store_true', help='skip the seed tf.data half')
  p.add_argument('--tf_venv', default=DEFAULT_TF_VENV,
                 help='venv for the tf.data half, created if missing (default %(default)s)')
  p.add_argument('--data_dir', default=DEFAULT_DATA, help='Multi30k {train,val}.{en,fr}')
  p.add_argument('--workers', default='0,2', help='config.data.num_workers values to time')
  p.add_argument('--baseline', default='',
                 help='also time the packed num_workers=0 pipeline as committed at this git '
                 'revision (side by side, same data and tokenizer)')
  p.add_argument('--bestfit_bins', default='',
                 help="comma-separated bin counts: also time Grain's BestFitPackIterDataset "
                 'on the same stream (packed, num_workers=0)')
  p.add_argument('--skip_check', action='store_true', help='skip the correctness pass')
  p.add_argument('--profile', action='store_true',
                 help='also cProfile the packed num_workers=0 pipeline')
  p.add_argument('--json', help='also write the results here')
  p.add_argument('--keep_workdir', action='store_true', help='keep the temp dir, print it')
  # Internal: the tf.data half, run in the tf venv.
  p.add_argument('--_seed_worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--pairs', help=argparse.SUPPRESS)
  p.add_argument('--tokenizer', help=argparse.SUPPRESS)
  p.add_argument('--kept', type=int, help=argparse.SUPPRESS)
  # Internal: the --baseline revision's pipeline, run in a subprocess.
  p.add_argument('--_project_worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--project_root', help=argparse.SUPPRESS)
  p.add_argument('--worker_args', help=argparse.SUPPRESS)
  p.add_argument('--prompt', help=argparse.SUPPRESS)  # tokenizer.prompt_text('{src}')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._seed_worker:
    seed_worker(args)
    return 0
  if args._project_worker:
    project_worker(args)
    return 0
  data_dir = os.path.abspath(args.data_dir)
  if not all(os.path.isfile(os.path.join(data_dir, f'{split}.{lang}'))
             for split in ('train', 'val') for lang in ('en', 'fr')):
    print(f'benchmarks/pipeline.py: no Multi30k data at {data_dir} '
          '(../shared/data/multi30k); nothing to benchmark.')
    return 0
  sys.path.insert(0, REPO)  # configs/
  import numpy as np
  from absl import flags
  from mtnt_tpu.data import records
  # Grain's mp_prefetch reads an absl flag; outside absl.app.run nothing has
  # parsed them, and num_workers > 0 would stop with UnparsedFlagAccessError.
  flags.FLAGS([sys.argv[0]])

  tf_python = None if args.skip_tf else ensure_tf_venv(args.tf_venv)
  work = tempfile.mkdtemp(prefix='mtnt_pipeline_bench_')
  try:
    prepared = prepare_data(data_dir, work)
    pairs = records.read_all(os.path.join(prepared, 'train.array_record'))
    tok_path = os.path.join(work, 'tokenizer.model')
    t = time.perf_counter()
    train_tokenizer(pairs, tok_path)
    print(f'tokenizer: {VOCAB_SIZE} BPE pieces trained on {len(pairs)} pairs in '
          f'{time.perf_counter() - t:.1f}s', flush=True)
    with open(os.path.join(work, 'train_pairs.jsonl'), 'w', encoding='utf-8') as f:
      for p in pairs:  # the seed reads the very pairs prepare wrote
        f.write(json.dumps({'src': p.src, 'dst': p.dst}, ensure_ascii=False) + '\n')

    workers = [int(w) for w in args.workers.split(',') if w.strip()]
    # (variant, packing, num_workers); 'baseline' is --baseline's revision.
    configs = [('mtnt_tpu', packing, w) for packing in (True, False) for w in workers]
    if args.baseline:
      configs.insert(0, ('baseline', True, 0))
    configs += [(f'bestfit:{b}', True, 0) for b in args.bestfit_bins.split(',') if b.strip()]
    checks = {}
    if not args.skip_check:
      for packing in (True, False):
        t = time.perf_counter()
        checks[packing] = check_epoch(prepared, tok_path, packing=packing, num_workers=0,
                                      max_len=args.max_len, batch_size=args.batch_size)
        c = checks[packing]
        print(f'check ({"packed" if packing else "padded"}, {c["consumed"]} examples): '
              f'{c["seen"]}/{c["records"]} records seen, all by example '
              f'{c["consumed_to_see_all"]} ({c["seen_after_one_epoch_of_examples"]} after '
              f'one epoch\'s worth), '
              f'{c["truncated"]} longer than {args.max_len} tokens, errors: '
              f'{c["errors"] or "none"} [{time.perf_counter() - t:.1f}s]', flush=True)
      lengths = checks[True]['lengths']
      print(f'tokens per example (prompt + target): mean {lengths.mean():.1f}, '
            f'median {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, '
            f'max {lengths.max()}; <= {SEED_MAX_LEN}: {(lengths <= SEED_MAX_LEN).mean():.1%}',
            flush=True)

    seed_runs, runs = [], {c: [] for c in configs}
    seed_info = {}
    for rep in range(args.repeats):
      order = configs[rep % len(configs):] + configs[:rep % len(configs)]
      if tf_python:
        r = run_seed(tf_python, work, args, seed_info.get('kept'))
        seed_info.update({k: r[k] for k in ('tensorflow', 'total', 'kept') if k in r})
        seed_runs.append(r)
        print(f'[{rep + 1}/{args.repeats}] seed tf.data: '
              f'{r["examples"] / r["seconds"]:,.0f} examples/s ({r["batches"]} batches, '
              f'{r["epochs"]} epochs)', flush=True)
      for variant, packing, w in order:
        kw = dict(packing=packing, num_workers=w, max_len=args.max_len,
                  batch_size=args.batch_size, batches=args.batches)
        if variant == 'baseline':
          r = measure_baseline(args.baseline, work, json.dumps(
              dict(kw, data_dir=prepared, tok_path=tok_path)))
        else:
          r = measure_project(prepared, tok_path, variant=variant, **kw)
        runs[(variant, packing, w)].append(r)
        if r['segments'] != r['examples']:
          print(f'  note: {r["segments"]} segments but {r["examples"]} distinct indices')
        print(f'[{rep + 1}/{args.repeats}] {label(variant, packing, w, args)}: '
              f'{r["examples"] / r["seconds"]:,.0f} examples/s', flush=True)

    rows = []
    if seed_runs:
      rows.append(summarize(f'seed tf.data (max {SEED_MAX_LEN}, padded, tf '
                            f'{seed_info["tensorflow"]})', seed_runs,
                            seed_info['kept'] / seed_info['total']))
    for variant, packing, w in configs:
      check = checks.get(packing) if variant == 'mtnt_tpu' else None
      kept = check['seen'] / check['records'] if check else float('nan')
      note = f' ({check["truncated"]} truncated)' if check and check['truncated'] else ''
      rows.append(summarize(label(variant, packing, w, args), runs[(variant, packing, w)],
                            kept, note))
    base = rows[0]['examples_per_s'] if seed_runs or args.baseline else None
    seed_note = (f'; seed: {seed_runs[0]["batches"]} batches = {seed_runs[0]["epochs"]} whole '
                 'epochs, first included' if seed_runs else '')
    print(f'\n{args.batch_size} rows per batch; mtnt_tpu: {args.batches} timed batches after the '
          f'first{seed_note}; median of {args.repeats}; {os.cpu_count()} CPUs\n')
    print(table(rows, base, 'seed' if seed_runs else 'baseline'))
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'args': {k: v for k, v in vars(args).items() if not k.startswith('_')},
                   'rows': rows, 'seed_runs': seed_runs,
                   'runs': {label(*c, args): v for c, v in runs.items()},
                   'checks': {str(k): {kk: vv for kk, vv in v.items() if kk != 'lengths'}
                              for k, v in checks.items()}}, f, indent=2)
    if args.profile:
      print(f'\n## Stage costs, wall us per example, single-threaded unless named, '
            f'{os.cpu_count()} CPUs\n')
      for name, us in stage_costs(prepared, tok_path, max_len=args.max_len,
                                  batch_size=args.batch_size):
        print(f'{us:8.1f}  {name}')
      profile_project(prepared, tok_path, max_len=args.max_len, batch_size=args.batch_size,
                      batches=args.batches)
  finally:
    if args.keep_workdir:
      print(f'workdir kept: {work}')
    else:
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
