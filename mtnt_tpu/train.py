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
import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import evaluate as evaluate_lib
from mtnt_tpu import flops
from mtnt_tpu import formats
from mtnt_tpu import lora as lora_lib
from mtnt_tpu import metrics as metrics_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import optim
from mtnt_tpu import runtime
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
  # The plain Gemma weights that evaluation, decoding and export read. Without
  # LoRA they are the trained params; with it, the base with adapters folded in.
  abstract_params: object
  params_shardings: object
  lora: lora_lib.LoraSpec | None = None
  freeze: optim.Freeze = optim.Freeze()  # config.train.freeze
  abstract_frozen: object = dataclasses.field(default_factory=dict)  # the LoRA base
  frozen_shardings: object = dataclasses.field(default_factory=dict)

  @property
  def random_init(self) -> bool:
    return checkpoint_lib.pretrained_path(self.config.model) is None


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
  parse_step_range(c.profile.steps)
  divisor = sharding.batch_divisor(mesh) * c.optim.grad_accum_steps
  if c.train.batch_size % divisor:
    raise ValueError(
        f'config.train.batch_size={c.train.batch_size} must be a multiple of '
        f'{divisor} (mesh batch axes {sharding.batch_divisor(mesh)} x '
        f'config.optim.grad_accum_steps={c.optim.grad_accum_steps})')
  if not 0 <= c.data.noise <= 1:
    raise ValueError(f'config.data.noise={c.data.noise}: a fraction of training examples, '
                     'from 0 (clean) to 1')
  if c.model.loss_chunk < 0:
    raise ValueError(f'config.model.loss_chunk={c.model.loss_chunk}: use tokens per chunk '
                     '(> 0), or 0 for whole logits')
  if not 0 <= c.model.loss_positions <= 1 or (c.model.loss_positions and not c.model.loss_chunk):
    raise ValueError(f'config.model.loss_positions={c.model.loss_positions}: a fraction of '
                     'each row from 0 (off) to 1, and it needs config.model.loss_chunk > 0')
  pipeline.check_overlong(c.data.overlong)
  for section, name in (('model', 'param_dtype'), ('model', 'compute_dtype'),
                        ('lora', 'base_dtype')):
    if c[section][name] not in ('float32', 'bfloat16'):
      raise ValueError(f"config.{section}.{name}={c[section][name]!r}: use 'float32' or "
                       "'bfloat16'")
  if lora_lib.LoraSpec.from_config(c.lora) and optim.Freeze.from_config(c.train.freeze):
    raise ValueError('config.train.freeze is for full fine-tuning; with config.lora.rank > 0 '
                     'only the adapters train already: set one of them')
  evaluate_lib.check_config(c)
  if c.model.checkpoint == '' and not c.model.variant.startswith('tiny'):
    raise ValueError(
        f'config.model.checkpoint is empty for {c.model.variant}: point it at a Kaggle '
        "Flax dir, a Hugging Face dir or a .gguf file, or set it to 'random' to train "
        'from scratch')


def _check_files(c) -> None:
  if c.train.batch_size % jax.process_count():
    raise ValueError(f'config.train.batch_size={c.train.batch_size} must divide over '
                     f'{jax.process_count()} processes')
  for split in (c.data.train_split, c.data.eval_split):
    pipeline.split_paths(c.data.dir, split)
  shards = pipeline.num_data_shards(c.data, pipeline.HostShard.current())
  if c.train.batch_size % shards:
    raise ValueError(f'config.train.batch_size={c.train.batch_size} must be a multiple of '
                     f'config.data.num_shards={shards}')
  pretrained = checkpoint_lib.pretrained_path(c.model)
  if pretrained:
    formats.detect(pretrained)


def _build(config, devices, vocab_size) -> Run:
  c = config
  if vocab_size is None and not c.tokenizer.path and c.model.checkpoint not in ('', 'random'):
    # The checkpoint's own tokenizer; recorded in the workdir's config.json.
    c = ml_collections.ConfigDict(c.to_dict())
    c.tokenizer.path = formats.tokenizer_path('', c.model.checkpoint)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices, dcn_data=c.mesh.dcn_data)
  _check_config(c, mesh)
  tok = None
  if vocab_size is None:
    _check_files(c)
    tok = tokenizer_lib.Tokenizer(c.tokenizer.path)
    vocab_size = tok.vocab_size
  model_cfg = model_lib.build_config(c.model.variant, vocab_size)
  plain = model_lib.make_model(model_cfg, c.model.remat)
  spec = lora_lib.LoraSpec.from_config(c.lora)
  model = lora_lib.LoraModel(plain, spec) if spec else plain
  freeze = optim.Freeze.from_config(c.train.freeze)
  freeze.check(model_lib.abstract_params(plain, c.model.param_dtype))
  optimizer, schedule = optim.make(c.optim, c.train.num_steps, freeze)

  abstract = jax.eval_shape(
      functools.partial(_fresh_state, model, spec, optimizer, c), jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh)
  abstract_params = model_lib.abstract_params(
      plain, c.lora.base_dtype if spec else c.model.param_dtype)
  params_shardings = sharding.tree_shardings(abstract_params, mesh)
  return Run(
      config=c, mesh=mesh, model_config=model_cfg, model=model, tokenizer=tok,
      optimizer=optimizer, schedule=schedule,
      abstract_state=checkpoint_lib.with_shardings(abstract, shardings),
      state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh),
      local_batch=c.train.batch_size // jax.process_count(),
      compute_dtype=jnp.dtype(c.model.compute_dtype),
      abstract_params=checkpoint_lib.with_shardings(abstract_params, params_shardings),
      params_shardings=params_shardings, lora=spec, freeze=freeze,
      abstract_frozen=(checkpoint_lib.with_shardings(abstract_params, params_shardings)
                       if spec else {}),
      frozen_shardings=params_shardings if spec else {})


def _fresh_state(model, spec, optimizer, c, rng) -> steps.TrainState:
  params, _ = _init_params(model, spec, rng, c)
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))


def _init_params(model, spec, rng, c) -> tuple[dict, dict]:
  """(trained params, frozen base): all params and {}, or LoRA adapters and base."""
  params = model_lib.init_params(model, rng, c.model.param_dtype)
  if spec is None:
    return params, {}
  base, adapters = lora_lib.split(params)
  return adapters, jax.tree.map(lambda p: p.astype(c.lora.base_dtype), base)


def init_state(run: Run, rng: jax.Array) -> steps.TrainState:
  """Random init, computed sharded: no array is ever whole on one device."""
  f = functools.partial(_fresh_state, run.model, run.lora, run.optimizer, run.config)
  return jax.jit(f, out_shardings=run.state_shardings)(rng)


def load_pretrained(run: Run) -> steps.TrainState:
  """Pretrained weights (any checkpoint format) in their shardings, fresh optimizer state.

  With LoRA the weights are the frozen base (see `frozen_base`) and the
  trained state is freshly initialised adapters.
  """
  if run.lora:
    return init_state(run, jax.random.key(run.config.train.seed))
  params = formats.load(run.config.model.checkpoint, run.abstract_state.params,
                        run.config.model.variant)
  params = jax.tree.map(lambda p: p.astype(run.config.model.param_dtype), params)
  opt_state = jax.jit(run.optimizer.init, out_shardings=run.state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return steps.TrainState(step=step, params=params, opt_state=opt_state)


def frozen_base(run: Run) -> dict:
  """The LoRA base ({} without LoRA): the Kaggle weights, or for a randomly
  initialised tiny model the same init as train.seed gives, so a resumed run
  and `translate` find the base its adapters were trained on."""
  if not run.lora:
    return {}
  if not run.random_init:
    path = run.config.model.checkpoint
    if '://' not in path and not os.path.exists(path):
      raise FileNotFoundError(
          f'the LoRA base config.model.checkpoint={path!r} does not exist; the adapters '
          'were trained on it: put it back there, or point the field at its new place')
    return formats.load(path, run.abstract_frozen, run.config.model.variant)
  f = lambda rng: _init_params(run.model, run.lora, rng, run.config)[1]
  return jax.jit(f, out_shardings=run.frozen_shardings)(jax.random.key(run.config.train.seed))


def inference_fn(run: Run):
  """(trained params, frozen) -> plain Gemma weights for eval, decoding and export.

  With LoRA the adapters are folded in; built once per run, so every eval
  reuses one compiled fold.
  """
  if not run.lora:
    return lambda params, frozen: params
  fold = lambda params, frozen: lora_lib.fold(frozen, params, run.lora,
                                              run.model_config.transpose_gating_einsum)
  return jax.jit(fold, out_shardings=run.params_shardings)


def compile_steps(run: Run):
  """AOT-compiled train and eval steps with explicit shardings; state donated."""
  t0 = time.perf_counter()
  train, evaluate = lower_steps(run)
  train_c, eval_c = train.compile(), evaluate.compile()
  return train_c, eval_c, time.perf_counter() - t0


def lower_steps(run: Run):
  """The train and eval steps lowered against abstract inputs (aot.py compiles these too)."""
  L = run.config.data.max_len
  B = run.config.train.batch_size
  batch_spec = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=run.batch_sharding)
                for k in pipeline.MODEL_KEYS}
  batch_shardings = {k: run.batch_sharding for k in pipeline.MODEL_KEYS}
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  train = jax.jit(
      functools.partial(steps.train_step, model=run.model, optimizer=run.optimizer,
                        compute_dtype=run.compute_dtype,
                        accum_steps=run.config.optim.grad_accum_steps,
                        loss_chunk=run.config.model.loss_chunk,
                        loss_positions=run.config.model.loss_positions, freeze=run.freeze),
      in_shardings=(run.state_shardings, batch_shardings, run.frozen_shardings),
      out_shardings=(run.state_shardings, replicated),
      donate_argnums=(0,))
  # Evaluation reads plain weights (LoRA folded in), so it needs no adapters.
  evaluate = jax.jit(
      functools.partial(steps.eval_step, model=model_lib.make_model(run.model_config),
                        compute_dtype=run.compute_dtype, loss_chunk=run.config.model.loss_chunk,
                        loss_positions=run.config.model.loss_positions),
      in_shardings=(run.params_shardings, batch_shardings),
      out_shardings=replicated)
  return (train.lower(run.abstract_state, batch_spec, run.abstract_frozen),
          evaluate.lower(run.abstract_params, batch_spec))


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Checks the workdir is readable, writable and of this model; records the config.

  Runs after every other check and before anything is compiled, so a bad
  config never leaves a workdir behind and a bucket without credentials fails
  in seconds.
  """
  root = epath.Path(workdir)
  path = root / 'config.json'
  try:
    old = json.loads(path.read_text()) if path.exists() else None
    if old is None and jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      tmp = root / 'config.json.tmp'
      tmp.write_text(config.to_json_best_effort(indent=2))
      tmp.rename(path)
  except Exception as e:  # noqa: BLE001 - local, GCS and fsspec errors differ
    hint = ('give this VM\'s service account write access to the bucket, or run '
            '`gcloud auth application-default login`' if '://' in workdir
            else 'choose a --workdir you can write')
    raise ConfigError(f'cannot use workdir {workdir} ({type(e).__name__}: {e}); {hint}') from e
  # What the checkpoints' tree depends on: another value could never restore.
  for section, field in (('model', 'variant'), ('lora', 'rank'), ('lora', 'targets')):
    was = (old or {}).get(section, {}).get(field, config[section][field])
    if was != config[section][field]:
      raise ConfigError(
          f'workdir {workdir} holds a run with config.{section}.{field}={was!r}, this config '
          f'has {config[section][field]!r}; use a new --workdir (or the old value)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to config.train.num_steps (or a SIGTERM); returns the last metrics."""
  t_start = time.perf_counter()
  run = build(config)
  c = run.config  # with the checkpoint's tokenizer when config.tokenizer.path was empty
  prepare_workdir(workdir, c)
  logging.info('mesh %s over %d devices (%d processes); parameter shardings:\n%s',
               dict(run.mesh.shape), run.mesh.size, jax.process_count(),
               sharding.describe(run.abstract_state.params, run.state_shardings.params))
  cache = runtime.enable_compilation_cache(c.runtime.compilation_cache, workdir)
  if jax.process_index() == 0:  # a scan of the data: once, by the process that logs
    lengths = pipeline.length_report(c.data, run.tokenizer, c.model.chat_template)
    logging.info('%s', lengths.describe(c.data.max_len, c.data.overlong))

  ckpts = checkpoint_lib.Checkpoints(workdir, c.train.keep_checkpoints,
                                     c.eval.best_metric, c.eval.best_mode)
  data_iter = iter(pipeline.train_dataset(c.data, c.tokenizer.path, c.train.batch_size,
                                          pipeline.HostShard.current(),
                                          chat_template=c.model.chat_template))
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

  frozen = frozen_base(run)
  train_step, eval_step, compile_s = compile_steps(run)
  logging.info('compiled train and eval steps in %.1fs (compilation cache: %s)',
               compile_s, cache or 'off')
  writer = metrics_lib.Writer(workdir)
  preemption = runtime.Preemption()
  try:
    return _loop(run, state, frozen, data_iter, train_step,
                 evaluate_lib.Evaluator(run, eval_step, workdir), ckpts, writer, preemption,
                 Profile(c.profile.steps, workdir), startup=(t_start, compile_s))
  finally:
    preemption.close()
    ckpts.close()
    writer.close()


class Profile:
  """A JAX profile of steps [start, stop) into WORKDIR/profile (TensorBoard, Perfetto)."""

  def __init__(self, steps_range: str, workdir: str):
    self.start, self.stop = parse_step_range(steps_range)
    self._dir = os.path.join(workdir, 'profile')

  def before(self, step: int) -> None:
    if step == self.start:
      jax.profiler.start_trace(self._dir)

  def after(self, step: int, state) -> None:
    if step + 1 == self.stop:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      logging.info('profile of steps %d..%d written to %s', self.start, self.stop - 1, self._dir)


def parse_step_range(text: str) -> tuple[int, int]:
  """'10:13' -> (10, 13); '' -> (-1, -1)."""
  if not text:
    return -1, -1
  try:
    start, stop = (int(x) for x in text.split(':'))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise ValueError(f"config.profile.steps={text!r}: use 'START:STOP' with "
                     "START < STOP, e.g. '10:13'")
  return start, stop


def _step_log(run: Run, writer) -> metrics_lib.StepLog:
  c, m = run.config, run.model_config
  n_params = sum(p.size for p in jax.tree.leaves(run.abstract_params))
  peak, source = flops.peak_per_device(jax.devices()[0], c.runtime.peak_tflops)
  per_token = flops.per_token(n_params, m.num_layers, m.num_heads, m.head_dim, c.data.max_len,
                              weight_grads=run.lora is None)
  logging.info('model FLOPs per token %.3g (%d x %d params + attention); peak %.3g FLOP/s '
               'per device (%s)', per_token, 4 if run.lora else 6, n_params, peak, source)
  return metrics_lib.StepLog(writer, tokens_per_row_batch=c.train.batch_size * c.data.max_len,
                             schedule=run.schedule, flops_per_token=per_token,
                             peak_flops=peak * jax.device_count())


def _loop(run, state, frozen, data_iter, train_step, evaluate, ckpts, writer, preemption,
          profile, startup: tuple[float, float]) -> dict:
  c = run.config
  start, num_steps = int(jax.device_get(state.step)), c.train.num_steps
  log = _step_log(run, writer)
  every = lambda n, step: step % n == 0 or step == num_steps
  plain_params = inference_fn(run)
  if start == 0 and c.train.eval_at_start:
    writer.write(0, evaluate(plain_params(state.params, frozen), 0))
  log.pause()
  for step in range(start, num_steps):
    profile.before(step)
    t_in = time.perf_counter()
    batch = pipeline.to_global(next(data_iter), run.batch_sharding)
    input_s = time.perf_counter() - t_in
    state, device_metrics = train_step(state, batch, frozen)
    profile.after(step, state)
    done = step + 1
    if step == start:  # what a user waits for before the first step, and why
      jax.block_until_ready(state)
      writer.write(done, {'time_to_first_step': time.perf_counter() - startup[0],
                          'compile_time': startup[1]})
    log.add(done, device_metrics, input_s, close_interval=every(c.train.log_every, done))
    preempted = preemption.reached(done)
    if every(c.train.eval_every, done):
      log.flush()
      scores = evaluate(plain_params(state.params, frozen), done)
      writer.write(done, scores)
      log.last.update(scores)
      ckpts.save_best(done, state, scores)
      log.pause()
    if every(c.train.checkpoint_every, done) or preempted:
      log.flush()  # a NaN loss stops here, before it is saved
      ckpts.save(done, state, data_iter)
      log.pause()
    if preempted:
      logging.warning('preempted: saved step %d; rerun the same command to resume', done)
      break
  log.flush()
  return log.last
