"""The loop: build, restore, step, evaluate, checkpoint, log.

    config -> Run (mesh, model, shardings; every input checked, nothing compiled)
           -> state restored or loaded or initialised straight into its shardings
           -> for each step: global batch -> jitted, donating train_step
           -> every eval_every: eval loss over the whole eval split
           -> every checkpoint_every: {state, data iterator} through orbax
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import evaluate as evaluate_lib
from mtnt_tpu import metrics as metrics_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import optim
from mtnt_tpu import sharding
from mtnt_tpu import steps
from mtnt_tpu import tokenizer as tokenizer_lib
from mtnt_tpu.data import pipeline


class ConfigError(ValueError):
  """A bad config or input, found before anything is compiled or written."""


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything built from the config before the first compile."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_config: model_lib.TransformerConfig
  model: object
  tokenizer: tokenizer_lib.Tokenizer | None  # None in the fit check
  optimizer: object
  schedule: object
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: steps.TrainState
  batch_sharding: jax.sharding.NamedSharding
  local_batch: int  # rows this process feeds per step
  compute_dtype: jnp.dtype

  @property
  def random_init(self) -> bool:
    return self.config.model.checkpoint in ('', 'random')


def build(config: ml_collections.ConfigDict, devices=None, *,
          vocab_size: int | None = None) -> Run:
  """Checks every input and builds the run; raises ConfigError with the fix.

  `devices` defaults to every device of every process. With `vocab_size` the
  data, tokenizer and checkpoint files are not needed (the fit check compiles
  for a TPU it does not have, with files it does not have).
  """
  try:
    return _build(config, devices, vocab_size)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


def _check_config(c, mesh) -> None:
  model_lib.check_variant(c.model.variant)
  divisor = sharding.batch_divisor(mesh) * c.optim.grad_accum_steps
  if c.train.batch_size % divisor:
    raise ValueError(
        f'config.train.batch_size={c.train.batch_size} must be a multiple of '
        f'{divisor} (mesh batch axes {sharding.batch_divisor(mesh)} x '
        f'config.optim.grad_accum_steps={c.optim.grad_accum_steps})')
  if c.data.overlong not in ('truncate', 'drop'):
    raise ValueError(f"config.data.overlong={c.data.overlong!r}: use 'truncate' or 'drop'")
  for name in ('param_dtype', 'compute_dtype'):
    if getattr(c.model, name) not in ('float32', 'bfloat16'):
      raise ValueError(f"config.model.{name}={getattr(c.model, name)!r}: use 'float32' or 'bfloat16'")
  if c.model.checkpoint == '' and not c.model.variant.startswith('tiny'):
    raise ValueError(
        f'config.model.checkpoint is empty for {c.model.variant}: point it at the '
        "Kaggle Flax checkpoint dir, or set it to 'random' to train from scratch")


def _check_files(c) -> None:
  if c.train.batch_size % jax.process_count():
    raise ValueError(f'config.train.batch_size={c.train.batch_size} must divide over '
                     f'{jax.process_count()} processes')
  for split in (c.data.train_split, c.data.eval_split):
    pipeline.split_paths(c.data.dir, split)
  if (c.model.checkpoint not in ('', 'random') and not os.path.exists(c.model.checkpoint)
      and '://' not in c.model.checkpoint):
    raise ValueError(f'config.model.checkpoint={c.model.checkpoint!r} does not exist; '
                     'download the Kaggle Flax checkpoint and point the field at it')


def _build(config, devices, vocab_size) -> Run:
  c = config
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices, dcn_data=c.mesh.dcn_data)
  _check_config(c, mesh)
  tok = None
  if vocab_size is None:
    _check_files(c)
    tok = tokenizer_lib.Tokenizer(c.tokenizer.path)
    vocab_size = tok.vocab_size
  model_cfg = model_lib.build_config(c.model.variant, vocab_size)
  model = model_lib.make_model(model_cfg)
  optimizer, schedule = optim.make(c.optim, c.train.num_steps)

  def init_state(rng):
    params = model_lib.init_params(model, rng, c.model.param_dtype)
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optimizer.init(params))

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh)
  return Run(
      config=c, mesh=mesh, model_config=model_cfg, model=model, tokenizer=tok,
      optimizer=optimizer, schedule=schedule,
      abstract_state=checkpoint_lib.with_shardings(abstract, shardings),
      state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh),
      local_batch=c.train.batch_size // jax.process_count(),
      compute_dtype=jnp.dtype(c.model.compute_dtype))


def init_state(run: Run, rng: jax.Array) -> steps.TrainState:
  """Random init, computed sharded: no array is ever whole on one device."""
  def f(rng):
    params = model_lib.init_params(run.model, rng, run.config.model.param_dtype)
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=run.optimizer.init(params))
  return jax.jit(f, out_shardings=run.state_shardings)(rng)


def load_pretrained(run: Run) -> steps.TrainState:
  """Kaggle weights restored into their shardings, fresh optimizer state."""
  params = model_lib.load_kaggle_params(run.config.model.checkpoint, run.abstract_state.params)
  params = jax.tree.map(lambda p: p.astype(run.config.model.param_dtype), params)
  opt_state = jax.jit(run.optimizer.init, out_shardings=run.state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return steps.TrainState(step=step, params=params, opt_state=opt_state)


def compile_steps(run: Run):
  """AOT-compiled train and eval steps with explicit shardings; state donated."""
  L = run.config.data.max_len
  B = run.config.train.batch_size
  batch_spec = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=run.batch_sharding)
                for k in pipeline.MODEL_KEYS}
  batch_shardings = {k: run.batch_sharding for k in pipeline.MODEL_KEYS}
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  train = jax.jit(
      functools.partial(steps.train_step, model=run.model, optimizer=run.optimizer,
                        compute_dtype=run.compute_dtype,
                        accum_steps=run.config.optim.grad_accum_steps),
      in_shardings=(run.state_shardings, batch_shardings),
      out_shardings=(run.state_shardings, replicated),
      donate_argnums=(0,))
  evaluate = jax.jit(
      functools.partial(steps.eval_step, model=run.model, compute_dtype=run.compute_dtype),
      in_shardings=(run.state_shardings.params, batch_shardings),
      out_shardings=replicated)
  t0 = time.perf_counter()
  train_c = train.lower(run.abstract_state, batch_spec).compile()
  eval_c = evaluate.lower(run.abstract_state.params, batch_spec).compile()
  return train_c, eval_c, time.perf_counter() - t0


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and records the config; refuses a workdir of another model."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      old = json.load(f)
    old_variant = old.get('model', {}).get('variant')
    if old_variant != config.model.variant:
      raise ConfigError(
          f'workdir {workdir} holds a {old_variant} run, this config trains '
          f'{config.model.variant}; use a new --workdir')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.train.num_steps; returns the last logged metrics."""
  run = build(config)
  prepare_workdir(workdir, config)
  c = config
  logging.info('mesh %s over %d devices (%d processes); parameter shardings:\n%s',
               dict(run.mesh.shape), run.mesh.size, jax.process_count(),
               sharding.describe(run.abstract_state.params, run.state_shardings.params))

  ckpts = checkpoint_lib.Checkpoints(workdir, c.train.keep_checkpoints,
                                     c.eval.best_metric, c.eval.best_mode)
  data_iter = iter(pipeline.train_dataset(c.data, c.tokenizer.path, run.local_batch,
                                          pipeline.HostShard.current()))
  # Resume order: this workdir's latest, else pretrained weights, else random.
  latest = ckpts.latest_step()
  if latest is not None:
    logging.info('resuming from %s step %d', ckpts.directory, latest)
    state = ckpts.restore(latest, run.abstract_state, data_iter)
  elif not run.random_init:
    logging.info('loading pretrained weights from %s', c.model.checkpoint)
    state = load_pretrained(run)
  else:
    logging.info('random init of %s', c.model.variant)
    state = init_state(run, jax.random.key(c.train.seed))
  start = int(jax.device_get(state.step))

  train_step, eval_step, compile_s = compile_steps(run)
  logging.info('compiled train and eval steps in %.1fs', compile_s)
  evaluate = evaluate_lib.Evaluator(run, eval_step, workdir)
  writer = metrics_lib.Writer(workdir)
  last = {}
  try:
    last = _loop(run, state, start, data_iter, train_step, evaluate, ckpts, writer)
  finally:
    ckpts.close()
    writer.close()
  return last


def _loop(run, state, start, data_iter, train_step, evaluate, ckpts, writer) -> dict:
  c = run.config
  num_steps = c.train.num_steps
  rows_x_len = c.train.batch_size * c.data.max_len
  interval: list[dict] = []  # this log interval's device metrics, fetched one step behind
  pending = None
  input_s = 0.0
  clock = metrics_lib.Stopwatch()
  last: dict = {}

  def report(step, ms, elapsed, waited):
    ms = jax.device_get(ms)
    loss = float(np.mean([m['loss'] for m in ms]))
    if not math.isfinite(loss):
      raise FloatingPointError(
          f'loss is {loss} at step {step}; the last good checkpoint is kept in '
          f'{ckpts.directory}. Lower config.optim.learning_rate and rerun.')
    real = float(sum(m['real_tokens'] for m in ms))
    out = {'loss': loss, 'accuracy': float(np.mean([m['accuracy'] for m in ms])),
           'grad_norm': float(ms[-1]['grad_norm']),
           'learning_rate': float(run.schedule(step - 1)),
           'tokens_per_sec': real / elapsed,
           'all_tokens_per_sec': rows_x_len * len(ms) / elapsed,
           'step_time': elapsed / len(ms), 'input_wait_frac': waited / elapsed,
           'nonpad_fraction': real / (rows_x_len * len(ms))}
    writer.write(step, out)
    return out

  if start == 0 and c.train.eval_at_start:
    writer.write(0, evaluate(state.params, 0))
    clock.lap()
  for step in range(start, num_steps):
    t_in = time.perf_counter()
    batch = pipeline.to_global(next(data_iter), run.batch_sharding)
    input_s += time.perf_counter() - t_in
    state, m = train_step(state, batch)
    done = step + 1
    if pending is not None:  # the previous interval, now that this step is queued
      last = report(*pending)
      pending = None
    interval.append(m)
    is_last = done == num_steps
    if done % c.train.log_every == 0 or is_last:
      pending = (done, interval, clock.lap(), input_s)
      interval, input_s = [], 0.0
    do_eval = done % c.train.eval_every == 0 or is_last
    do_save = done % c.train.checkpoint_every == 0 or is_last
    if (do_eval or do_save) and pending is not None:
      last = report(*pending)
      pending = None
    if do_eval:
      scores = evaluate(state.params, done)
      writer.write(done, scores)
      last.update(scores)
      clock.lap()  # eval time is not training throughput
      ckpts.save_best(done, state, scores)
    if do_save:
      ckpts.save(done, state, data_iter)
  if pending is not None:
    last = report(*pending)
  return last
