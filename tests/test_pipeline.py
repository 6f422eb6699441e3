"""The Grain pipeline: packing is exact, resume is exact, hosts split the data."""

import collections
import os

import numpy as np
import pytest

from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu.data import pipeline
from mtnt_tpu.data import records
from tests import helpers


def _iter(cfg, batch, shard=pipeline.HostShard(0, 1)):
  return iter(pipeline.train_dataset(cfg.data, cfg.tokenizer.path, batch, shard))


def test_every_token_belongs_to_exactly_one_example():
  cfg = helpers.tiny_config()
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer.path)
  src = pipeline.source(cfg.data.dir, 'train')
  b = helpers.train_batches(cfg, 1)[0]
  seen = set()
  for r in range(b['inputs'].shape[0]):
    seg, idx = b['segment_ids'][r], b['index'][r]
    assert np.all((seg == 0) == (idx == -1))
    for s in set(seg[seg > 0].tolist()):
      where = np.nonzero(seg == s)[0]
      assert np.all(np.diff(where) == 1), 'a segment is contiguous'
      (i,) = set(idx[where].tolist())
      assert i not in seen, 'an example lands in one row once'
      seen.add(i)
      ex = pipeline.tokenize_example(tok, i, src[i], 'French', cfg.data.max_len)
      np.testing.assert_array_equal(b['inputs'][r, where], ex.inputs)
      np.testing.assert_array_equal(b['targets'][r, where], ex.targets)
      np.testing.assert_array_equal(b['mask'][r, where], ex.mask)
      np.testing.assert_array_equal(b['positions'][r, where], np.arange(len(where)))


def test_example_format_masks_the_prompt():
  cfg = helpers.tiny_config()
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer.path)
  record = records.encode(records.Pair('x', 'The cat.', 'Le chat.'))
  ex = pipeline.tokenize_example(tok, 7, record, 'French', 128)
  prompt, target = tok.encode_example('The cat.', 'Le chat.', 'French')
  assert ex.inputs[0] == tokenizer_lib.BOS and ex.targets[-1] == tokenizer_lib.EOS
  assert tok.decode(prompt[1:]) == 'Translate this into French:\nThe cat.\n'
  assert ex.mask.sum() == len(target)
  assert tok.decode(ex.targets[ex.mask == 1][:-1]) == 'Le chat.'


def test_overlong_examples_are_truncated_or_dropped_never_silently():
  cfg = helpers.tiny_config(**{'data.max_len': 16})
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer.path)
  src = pipeline.source(cfg.data.dir, 'train')
  ex = pipeline.tokenize_example(tok, 0, src[0], 'French', 16)
  assert ex.truncated and len(ex.inputs) == 16
  kept = helpers.train_batches(cfg, 3)
  dropped = helpers.train_batches(helpers.tiny_config(**{'data.max_len': 30,
                                                         'data.overlong': 'drop'}), 3)
  assert all(np.all(b['segment_ids'].max(axis=1) >= 1) for b in kept)
  full = {i: len(pipeline.tokenize_example(tok, i, src[i], 'French', 10_000).inputs)
          for i in range(len(src))}
  assert any(n > 30 for n in full.values())
  # Dropped, not cut: every example in the batches is whole and fits.
  seen = {i: np.sum(b['index'] == i) for b in dropped for i in set(b['index'].ravel()) if i >= 0}
  assert seen and all(n == full[i] <= 30 for i, n in seen.items())


def test_packing_fills_rows_padding_does_not():
  packed = helpers.train_batches(helpers.tiny_config(**{'data.max_len': 128}), 4)
  padded = helpers.train_batches(helpers.tiny_config(**{'data.max_len': 128,
                                                        'data.packing': False}), 4)
  fill = lambda bs: np.mean([np.mean(b['segment_ids'] > 0) for b in bs])
  assert fill(packed) > 0.9
  assert fill(padded) < 0.3
  assert all(np.all(b['segment_ids'].max(axis=1) == 1) for b in padded)


def _indices(batches):
  return [sorted(set(b['index'][r][b['index'][r] >= 0].tolist()))
          for b in batches for r in range(b['index'].shape[0])]


def test_restored_iterator_continues_exactly():
  cfg = helpers.tiny_config()
  it = _iter(cfg, 16)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = _iter(cfg, 16)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(4)]
  for a, b in zip(expected, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_restore_through_orbax_with_the_train_state(tmp_path):
  import jax.numpy as jnp
  from mtnt_tpu import checkpoint as checkpoint_lib
  cfg = helpers.tiny_config()
  it = _iter(cfg, 16)
  for _ in range(3):
    next(it)
  ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=2)
  ckpts.save(3, {'w': jnp.arange(4.0)}, it)
  expected = _indices([next(it) for _ in range(3)])
  ckpts.close()
  fresh = _iter(cfg, 16)
  ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=2)
  ckpts.restore(ckpts.latest_step(), {'w': jnp.zeros(4)}, fresh)
  assert _indices([next(fresh) for _ in range(3)]) == expected
  ckpts.close()


@pytest.mark.slow
def test_two_hosts_split_the_data_and_rebuild_the_same_global_batch():
  cfg = helpers.tiny_config(**{'data.num_shards': 2})
  one = _iter(cfg, 16)
  hosts = [_iter(cfg, 16, pipeline.HostShard(p, 2)) for p in range(2)]
  n = len(pipeline.source(cfg.data.dir, 'train'))
  seen = [collections.Counter(), collections.Counter()]
  for _ in range(200):  # ~2.5 examples a row: one epoch is ~100 batches
    g = next(one)
    parts = [next(h) for h in hosts]
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([parts[0][k], parts[1][k]]))
    for p in range(2):
      seen[p].update(i for i in np.unique(parts[p]['index']) if i >= 0)
  assert not set(seen[0]) & set(seen[1]), 'hosts read disjoint records'
  assert set(seen[0]) | set(seen[1]) == set(range(n)), 'together they cover the split'


def test_hosts_must_divide_the_shards():
  cfg = helpers.tiny_config(**{'data.num_shards': 3})
  with pytest.raises(ValueError, match='multiple of the 2 processes'):
    pipeline.train_dataset(cfg.data, cfg.tokenizer.path, 16, pipeline.HostShard(0, 2))


@pytest.mark.parametrize('packing', [True, False])
def test_eval_batches_cover_the_split_once_on_any_host_count(packing):
  cfg = helpers.tiny_config(**{'data.packing': packing})
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer.path)
  n = len(pipeline.source(cfg.data.dir, 'valid'))
  for hosts in (1, 3):
    per_host = [list(pipeline.eval_batches(cfg.data, tok, 8, pipeline.HostShard(p, hosts)))
                for p in range(hosts)]
    assert len({len(b) for b in per_host}) == 1, 'same batch count on every host'
    # Each example once: its tokens form one segment of one row.
    ids = [int(i) for bs in per_host for b in bs for row, seg in zip(b['index'], b['segment_ids'])
           for s in range(1, seg.max() + 1) for i in set(row[seg == s].tolist())]
    assert sorted(ids) == list(range(n))


def test_missing_split_names_prepare():
  with pytest.raises(FileNotFoundError, match='python -m mtnt_tpu.prepare'):
    pipeline.split_paths(os.path.dirname(__file__), 'train')


def test_length_report_counts_overlong_examples():
  cfg = helpers.tiny_config(**{'data.max_len': 30})
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer.path)
  report = pipeline.length_report(cfg.data, tok)
  src = pipeline.source(cfg.data.dir, 'train')
  lengths = [len(pipeline.tokenize_example(tok, i, src[i], 'French', 10_000).inputs)
             for i in range(len(src))]
  assert report.total == report.scanned == len(src)
  assert report.overlong == sum(n > 30 for n in lengths) > 0
  assert report.max_tokens == max(lengths)
  assert 'exceed max_len=30 and are truncated' in report.describe(30, 'truncate')


def test_pack_rows_places_every_example_once_without_overflow():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 60, size=300)
  examples = [{'inputs': np.full(n, i, np.int32), 'targets': np.full(n, i, np.int32),
               'mask': np.ones(n, np.int32), 'index': np.full(n, i, np.int32)}
              for i, n in enumerate(lengths)]
  rows = pipeline.pack_rows(examples, 64)
  seen = collections.Counter()
  for row in rows:
    assert row['inputs'].shape == (64,)
    for s in set(row['segment_ids'].tolist()) - {0}:
      where = row['segment_ids'] == s
      (i,) = set(row['index'][where].tolist())
      assert where.sum() == lengths[i]
      np.testing.assert_array_equal(row['positions'][where], np.arange(lengths[i]))
      seen[i] += 1
  assert sorted(seen) == list(range(300)) and set(seen.values()) == {1}
  assert sum(lengths) / (64 * len(rows)) > 0.95  # first-fit decreasing packs tight
