"""The loop: build, restore, step, evaluate, checkpoint, log.

    config -> Run (checks.py checks every input; state.py traces the sharded state)
           -> state restored, or loaded, or initialised straight into its shardings
           -> each step: global batch -> jitted, donating train_step -> log
           -> every eval_every: eval loss (and BLEU) over the eval split
           -> every checkpoint_every, or on SIGTERM: {state, data iterator} through orbax
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import checks
from mtnt_tpu import evaluate as evaluate_lib
from mtnt_tpu import flops
from mtnt_tpu import formats
from mtnt_tpu import metrics as metrics_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import runtime
from mtnt_tpu import sharding
from mtnt_tpu import state as state_lib
from mtnt_tpu import steps as steps_lib
from mtnt_tpu import workdir as workdir_lib
from mtnt_tpu.data import pipeline

ConfigError = checks.ConfigError


def build(config: ml_collections.ConfigDict,
          devices: list[jax.Device] | None = None) -> state_lib.Run:
  """Checks every input, files included, and builds the run; raises ConfigError.

  `devices` defaults to every device of every process.
  """
  try:
    config = _with_checkpoint_tokenizer(config)
    mesh = _mesh(config, devices)
    checks.check_config(config, mesh)
    return state_lib.run(config, mesh, checks.check_files(config))
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


def _with_checkpoint_tokenizer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An empty config.tokenizer.path reads the checkpoint's own tokenizer; the
  copy names it, so the workdir's config.json records where it came from."""
  pretrained = checkpoint_lib.pretrained_path(c.model)
  if c.tokenizer.path or not pretrained:
    return c
  c = ml_collections.ConfigDict(c.to_dict())
  c.tokenizer.path = formats.tokenizer_path('', pretrained)
  return c


def build_without_files(config: ml_collections.ConfigDict, devices: list[jax.Device],
                        vocab_size: int) -> state_lib.Run:
  """The run with no data, tokenizer or checkpoint read: what the fit check compiles
  for a TPU it does not have. Raises ConfigError."""
  try:
    mesh = _mesh(config, devices)
    checks.check_config(config, mesh)
    return state_lib.run(config, mesh, vocab_size=vocab_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _mesh(c: ml_collections.ConfigDict, devices) -> jax.sharding.Mesh:
  return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices, dcn_data=c.mesh.dcn_data)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The train and eval steps, lowered (aot.py compiles these) or compiled."""
  train: jax.stages.Lowered | jax.stages.Compiled
  eval: jax.stages.Lowered | jax.stages.Compiled
  compile_s: float = 0.0


def lower_steps(run: state_lib.Run) -> Steps:
  """The train and eval steps with explicit shardings, lowered against abstract inputs."""
  L, B = run.config.data.max_len, run.config.train.batch_size
  batch_spec = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=run.batch_sharding)
                for k in pipeline.MODEL_KEYS}
  batch_shardings = {k: run.batch_sharding for k in pipeline.MODEL_KEYS}
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  train = jax.jit(
      functools.partial(steps_lib.train_step, model=run.model, optimizer=run.optimizer,
                        compute_dtype=run.compute_dtype,
                        accum_steps=run.config.optim.grad_accum_steps,
                        loss_chunk=run.config.model.loss_chunk,
                        loss_positions=run.config.model.loss_positions, freeze=run.freeze),
      in_shardings=(run.state_shardings, batch_shardings, run.frozen_shardings),
      out_shardings=(run.state_shardings, replicated),
      donate_argnums=(0,))
  # Evaluation reads plain weights (LoRA folded in), so it needs no adapters.
  evaluate = jax.jit(
      functools.partial(steps_lib.eval_step, model=model_lib.make_model(run.model_config),
                        compute_dtype=run.compute_dtype, loss_chunk=run.config.model.loss_chunk,
                        loss_positions=run.config.model.loss_positions),
      in_shardings=(run.params_shardings, batch_shardings),
      out_shardings=replicated)
  return Steps(train=train.lower(run.abstract_state, batch_spec, run.abstract_frozen),
               eval=evaluate.lower(run.abstract_params, batch_spec))


def compile_steps(run: state_lib.Run) -> Steps:
  """The train and eval steps compiled ahead of time; the train state is donated."""
  t0 = time.perf_counter()
  lowered = lower_steps(run)
  return Steps(train=lowered.train.compile(), eval=lowered.eval.compile(),
               compile_s=time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class Loop:
  """What the loop holds, all built before the first step."""
  run: state_lib.Run
  frozen: state_lib.Params  # the LoRA base; {} without LoRA
  data: grain.DatasetIterator
  steps: Steps
  evaluate: evaluate_lib.Evaluator
  plain_params: Callable  # (trained params, frozen) -> plain Gemma weights
  ckpts: checkpoint_lib.Checkpoints
  writer: metrics_lib.Writer
  log: metrics_lib.StepLog
  preemption: runtime.Preemption
  profile: runtime.Profile
  started: float  # time.perf_counter() when the command started


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.train.num_steps (or a SIGTERM); returns the last metrics."""
  started = time.perf_counter()
  workdir = workdir_lib.resolve(workdir)
  run = build(config)
  c = run.config  # with the checkpoint's tokenizer when config.tokenizer.path was empty
  workdir_lib.prepare(workdir, c)
  logging.info('mesh %s over %d devices (%d processes); parameter shardings:\n%s',
               dict(run.mesh.shape), run.mesh.size, jax.process_count(),
               sharding.describe(run.abstract_state.params, run.state_shardings.params))
  cache = runtime.enable_compilation_cache(c.runtime.compilation_cache, workdir)
  if jax.process_index() == 0:  # a scan of the data: once, by the process that logs
    lengths = pipeline.length_report(c.data, run.tokenizer, c.model.chat_template)
    logging.info('%s', lengths.describe(c.data.max_len, c.data.overlong))

  ckpts = checkpoint_lib.Checkpoints(workdir, c.train.keep_checkpoints,
                                     c.eval.best_metric, c.eval.best_mode)
  state, data = _initial_state(run, ckpts)
  workdir_lib.record_config(workdir, c)
  steps = compile_steps(run)
  logging.info('compiled train and eval steps in %.1fs (compilation cache: %s)',
               steps.compile_s, cache or 'off')
  evaluator = evaluate_lib.Evaluator(run, steps.eval, workdir)
  writer = metrics_lib.Writer(workdir)
  budget = flops.training_budget(run.model_config, run.abstract_params, c.data.max_len,
                                 lora=run.lora is not None, peak_tflops=c.runtime.peak_tflops,
                                 frozen_params=run.freeze.count(run.abstract_params))
  log = metrics_lib.StepLog(writer, tokens_per_step=c.train.batch_size * c.data.max_len,
                            schedule=run.schedule, budget=budget)
  preemption = runtime.Preemption()
  try:
    return _loop(Loop(
        run=run, frozen=state_lib.frozen_base(run), data=data, steps=steps,
        evaluate=evaluator, plain_params=state_lib.inference_fn(run), ckpts=ckpts,
        writer=writer, log=log, preemption=preemption,
        profile=runtime.Profile(c.profile.steps, workdir), started=started), state)
  finally:
    preemption.close()
    ckpts.close()
    writer.close()


def _initial_state(run: state_lib.Run, ckpts: checkpoint_lib.Checkpoints
                   ) -> tuple[steps_lib.TrainState, grain.DatasetIterator]:
  """The resume order: this workdir's newest intact checkpoint, else pretrained
  weights, else random init; with the data iterator where that state left it."""
  c = run.config
  data = _train_data(c)
  newest = ckpts.restore_newest(run.abstract_state, data)
  if newest is not None:
    logging.info('resuming from %s step %d', ckpts.directory, newest[0])
    return newest[1], data
  data = _train_data(c)  # a failed restore may have moved it
  if not run.random_init:
    logging.info('loading pretrained weights from %s', c.model.checkpoint)
    return state_lib.load_pretrained(run), data
  logging.info('random init of %s', c.model.variant)
  return state_lib.init_state(run, jax.random.key(c.train.seed)), data


def _train_data(c: ml_collections.ConfigDict) -> grain.DatasetIterator:
  return iter(pipeline.train_dataset(c.data, c.tokenizer.path, c.train.batch_size,
                                     pipeline.HostShard.current(),
                                     chat_template=c.model.chat_template))


def _loop(loop: Loop, state: steps_lib.TrainState) -> dict:
  c, run, log = loop.run.config, loop.run, loop.log
  start, num_steps = int(jax.device_get(state.step)), c.train.num_steps
  every = lambda n, step: step % n == 0 or step == num_steps
  last: dict[str, float] = {}
  if start == 0 and c.train.eval_at_start:
    last = _evaluate(loop, state, 0) or {}
  for step in range(start, num_steps):
    done = step + 1
    loop.profile.before(step)
    t_in = time.perf_counter()
    batch = pipeline.to_global(next(loop.data), run.batch_sharding)
    state, device_metrics = loop.steps.train(state, batch, loop.frozen)
    log.add(device_metrics, time.perf_counter() - t_in)
    loop.profile.after(step, state)
    if step == start:  # what a user waits for before the first step, and why
      jax.block_until_ready(state)
      loop.writer.write(done, {'time_to_first_step': time.perf_counter() - loop.started,
                               'compile_time': loop.steps.compile_s})
    if every(c.train.log_every, done):
      last = log.close(done)
      loop.ckpts.check_finite(done, state, last['loss'])
    preempted = loop.preemption.reached(done)
    if every(c.train.eval_every, done) and not preempted:
      with log.paused():
        scores = _evaluate(loop, state, done)
        if scores is not None:
          last.update(scores)
          loop.ckpts.save_best(done, state, scores)
      preempted = scores is None
    if every(c.train.checkpoint_every, done) or preempted:
      with log.paused():
        loop.ckpts.save(done, state, loop.data)
    if preempted:
      logging.warning('preempted: saved step %d; rerun the same command to resume', done)
      break
  return last


def _evaluate(loop: Loop, state: steps_lib.TrainState, step: int) -> dict | None:
  """The eval scores, written; None when a SIGTERM cut the eval short."""
  try:
    with loop.preemption.interruptible():
      scores = loop.evaluate(loop.plain_params(state.params, loop.frozen), step)
  except runtime.Preempted:
    logging.warning('SIGTERM during the eval of step %d: eval dropped to save first', step)
    return None
  loop.writer.write(step, scores)
  return scores
