"""The model on its mesh, the train state, and the weights, built sharded.

Every tree starts abstract: `jax.eval_shape` of the init gives shapes and
dtypes, the rules in sharding.py give each leaf its sharding, and weights are
then initialised by a jitted init with those out_shardings, read from a
pretrained checkpoint into them, or restored by orbax into them. No array is
ever whole on one host.

  Setup  a Gemma on a mesh: what evaluation, decoding, translate and export need
  Run    a Setup plus the optimizer and the abstract train state: what training needs
"""

from __future__ import annotations

import dataclasses
import functools
import os
import jax
import jax.numpy as jnp
from flax import linen as nn
import ml_collections
import optax

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import formats
from mtnt_tpu import lora as lora_lib
from mtnt_tpu import model as model_lib
from mtnt_tpu import optim
from mtnt_tpu import sharding
from mtnt_tpu import steps
from mtnt_tpu import tokenizer as tokenizer_lib

Params = model_lib.Params


@dataclasses.dataclass(frozen=True)
class Setup:
  """A Gemma on a mesh, every tree abstract; nothing compiled or loaded."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_config: model_lib.TransformerConfig
  model: nn.Module | lora_lib.LoraModel  # what is trained: Gemma, or Gemma with adapters
  lora: lora_lib.LoraSpec | None
  tokenizer: tokenizer_lib.Tokenizer | None  # None in the fit check
  batch_sharding: jax.sharding.NamedSharding
  compute_dtype: jnp.dtype
  # The plain Gemma weights that evaluation, decoding and export read, as
  # ShapeDtypeStructs carrying their shardings. Without LoRA they are the
  # trained params; with it, the frozen base with the adapters folded in.
  abstract_params: Params

  @property
  def params_shardings(self) -> Params:
    return _shardings(self.abstract_params)

  @property
  def abstract_frozen(self) -> Params:
    """The LoRA base (the plain weights' tree); {} without LoRA."""
    return self.abstract_params if self.lora else {}

  @property
  def frozen_shardings(self) -> Params:
    return _shardings(self.abstract_frozen)

  @property
  def random_init(self) -> bool:
    return checkpoint_lib.pretrained_path(self.config.model) is None


@dataclasses.dataclass(frozen=True)
class Run(Setup):
  """A Setup with what training adds."""
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings
  local_batch: int  # rows this process feeds per step
  freeze: optim.Freeze = optim.Freeze()  # config.train.freeze

  @property
  def state_shardings(self) -> steps.TrainState:
    return _shardings(self.abstract_state)


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          tokenizer: tokenizer_lib.Tokenizer | None = None,
          vocab_size: int | None = None) -> Setup:
  """The model of `config` on `mesh`; the vocabulary from `tokenizer` unless given."""
  c = config
  model_cfg = model_lib.build_config(c.model.variant,
                                     tokenizer.vocab_size if tokenizer else vocab_size)
  plain = model_lib.make_model(model_cfg, c.model.remat)
  spec = lora_lib.LoraSpec.from_config(c.lora)
  abstract_params = model_lib.abstract_params(
      plain, c.lora.base_dtype if spec else c.model.param_dtype)
  return Setup(
      config=c, mesh=mesh, model_config=model_cfg,
      model=lora_lib.LoraModel(plain, spec) if spec else plain, lora=spec,
      tokenizer=tokenizer, batch_sharding=sharding.batch_sharding(mesh),
      compute_dtype=jnp.dtype(c.model.compute_dtype),
      abstract_params=placed(abstract_params, mesh))


def run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
        tokenizer: tokenizer_lib.Tokenizer | None = None,
        vocab_size: int | None = None) -> Run:
  """`setup` plus the optimizer and the abstract train state."""
  base = setup(config, mesh, tokenizer, vocab_size)
  freeze = optim.Freeze.from_config(config.train.freeze)
  freeze.check(base.abstract_params)
  optimizer, schedule = optim.make(config.optim, config.train.num_steps, freeze)
  abstract = jax.eval_shape(
      functools.partial(_fresh_state, base.model, base.lora, optimizer, config),
      jax.random.key(0))
  return Run(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Setup)},
             optimizer=optimizer, schedule=schedule,
             abstract_state=placed(abstract, mesh),
             local_batch=config.train.batch_size // jax.process_count(), freeze=freeze)


def placed(abstract_tree, mesh: jax.sharding.Mesh):
  """ShapeDtypeStructs carrying the sharding the rules give each leaf."""
  shardings = sharding.tree_shardings(abstract_tree, mesh)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def _shardings(abstract_tree):
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


def abstract_trained(s: Setup) -> Params:
  """What a checkpoint's state.params holds: all the weights, or the LoRA adapters."""
  f = lambda rng: _init_params(s.model, s.lora, rng, s.config)[0]
  return placed(jax.eval_shape(f, jax.random.key(0)), s.mesh)


def _fresh_state(model, spec, optimizer, c, rng) -> steps.TrainState:
  params, _ = _init_params(model, spec, rng, c)
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))


def _init_params(model, spec, rng, c) -> tuple[Params, Params]:
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
  """Pretrained weights restored into their shardings, fresh optimizer state.

  With LoRA the weights are the frozen base (see `frozen_base`) and the
  trained state is freshly initialised adapters.
  """
  if run.lora:
    return init_state(run, jax.random.key(run.config.train.seed))
  params = _read_pretrained(run.config.model.checkpoint, run.abstract_state.params,
                            run.config.model.variant)
  params = jax.tree.map(lambda p: p.astype(run.config.model.param_dtype), params)
  shardings = run.state_shardings
  opt_state = jax.jit(run.optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return steps.TrainState(step=step, params=params, opt_state=opt_state)


def frozen_base(s: Setup) -> Params:
  """The LoRA base ({} without LoRA): the pretrained weights, or for a randomly
  initialised tiny model the same init as train.seed gives, so a resumed run
  and `translate` find the base its adapters were trained on."""
  if not s.lora:
    return {}
  if not s.random_init:
    path = s.config.model.checkpoint
    if '://' not in path and not os.path.exists(path):
      raise FileNotFoundError(
          f'the LoRA base config.model.checkpoint={path!r} does not exist; the adapters '
          'were trained on it: put it back there, or point the field at its new place')
    return _read_pretrained(path, s.abstract_frozen, s.config.model.variant)
  f = lambda rng: _init_params(s.model, s.lora, rng, s.config)[1]
  return jax.jit(f, out_shardings=s.frozen_shardings)(jax.random.key(s.config.train.seed))


def _read_pretrained(path: str, target: Params, variant: str) -> Params:
  """Pretrained weights at `path`, read into `target`'s shapes and shardings."""
  return formats.load(path, target, variant)


def inference_fn(s: Setup):
  """(trained params, frozen) -> plain Gemma weights for eval, decoding and export.

  With LoRA the adapters are folded in; built once per run, so every eval
  reuses one compiled fold.
  """
  if not s.lora:
    return lambda params, frozen: params
  fold = lambda params, frozen: lora_lib.fold(frozen, params, s.lora,
                                              s.model_config.transpose_gating_einsum)
  return jax.jit(fold, out_shardings=s.params_shardings)
