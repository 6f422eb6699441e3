"""Evaluation's loss over packed rows: the same sums as one example per row, in fewer rows."""

import jax
import numpy as np
import pytest

from mtnt_tpu import evaluate
from mtnt_tpu import train
from mtnt_tpu import state as state_lib
from tests import helpers


def _evaluator(tmp_path, packing: bool):
  run = train.build(helpers.tiny_config(**{'data.packing': packing,
                                           'eval.decode_examples': 0}))
  eval_step = train.compile_steps(run).eval
  return run, evaluate.Evaluator(run, eval_step, str(tmp_path))


@pytest.mark.slow
def test_packed_eval_loss_equals_padded_eval_loss(tmp_path):
  run, packed = _evaluator(tmp_path, packing=True)
  _, padded = _evaluator(tmp_path, packing=False)
  params = state_lib.init_state(run, jax.random.key(0)).params
  a, b = packed(params, 0), padded(params, 0)
  # Every target token counted once either way, and scored the same (the loss
  # sum differs only by float summation order).
  assert a['eval_target_tokens'] == b['eval_target_tokens'] > 0
  assert a['eval_accuracy'] == b['eval_accuracy']
  np.testing.assert_allclose(a['eval_loss'], b['eval_loss'], rtol=1e-5)
  assert 2 * len(packed._batches) <= len(padded._batches), 'packing saves most rows'
