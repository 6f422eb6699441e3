"""Fit check: compile the real train step for a TPU slice this machine does not have.

    python -m mtnt_tpu.aot --config configs/v4_8.py --topology v4-8 [--json OUT]
    python -m mtnt_tpu.aot --config configs/v4_8.py --topology 2xv4-8 \
        --config.model.remat=block --config.train.batch_size=128

libtpu compiles for a described topology without the chips, so the train step
`train.py` would run is compiled here, on the CPU, against abstract state and
batch. Its buffer assignment answers "does this config fit in HBM" before a
slice is rented. Prints per-chip memory against the chip's HBM, compiled FLOPs
against 6 x params x tokens, and the collectives in the compiled HLO. Exits 0
when it fits, 1 when it does not (with what to change), 2 on bad input, 3 if
it crashed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Iterator, Sequence

from absl import flags
import jax
from jax.experimental import topologies
import ml_collections
from ml_collections import config_flags

from mtnt_tpu import hlo
from mtnt_tpu import model as model_lib
from mtnt_tpu import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('topology', None, "TPU slice to compile for, e.g. 'v4-8', 'v4-128', or "
                      "'2xv4-8' for two v4-8 slices over DCN.")
  flags.DEFINE_integer('num_slices', None, "Slices of --topology (the same as an 'Nx' prefix).")
  flags.DEFINE_string('json', None, 'Also write the report as JSON here.')

GIB = 1 << 30
# An uncaught exception also exits 1 in Python; __main__ maps it to CRASHED so
# that 1 always means "does not fit".
USAGE_ERROR, DOES_NOT_FIT, CRASHED = 2, 1, 3


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # libtpu's name in 'v4:2x2x1'
  hbm_gib: float
  megacore: bool  # two TensorCores driven as one JAX device, as on a real slice


CHIPS = {
    'v4': Chip('v4', 32, megacore=True),
    'v5e': Chip('v5e', 16, megacore=False),
    'v5p': Chip('v5p', 95, megacore=True),
    'v6e': Chip('v6e', 32, megacore=False),
}

# Cloud accelerator type -> (chip, physical chip grid). v4 and v5p names count
# TensorCores (two per chip), v5e and v6e names count chips.
TOPOLOGIES: dict[str, tuple[str, str]] = {
    'v4-8': ('v4', '2x2x1'), 'v4-16': ('v4', '2x2x2'), 'v4-32': ('v4', '2x2x4'),
    'v4-64': ('v4', '2x4x4'), 'v4-128': ('v4', '4x4x4'),
    'v5p-8': ('v5p', '2x2x1'), 'v5p-16': ('v5p', '2x2x2'), 'v5p-32': ('v5p', '2x2x4'),
    'v5litepod-4': ('v5e', '2x2'), 'v5litepod-8': ('v5e', '2x4'),
    'v5litepod-16': ('v5e', '4x4'),
    'v6e-4': ('v6e', '2x2'), 'v6e-8': ('v6e', '2x4'), 'v6e-16': ('v6e', '4x4'),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. '2xv4-8'
  slice_name: str  # 'v4-8'
  chip: Chip
  grid: str  # '2x2x1'
  num_slices: int

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.generation}:{self.grid}'


def parse_topology(name: str, num_slices: int | None = None) -> Topology:
  """'v4-8', '2xv4-8' (two slices) -> Topology; ValueError names the known ones."""
  m = re.fullmatch(r'(?:(\d+)x)?(.+)', name.strip())
  prefix, slice_name = m.group(1), m.group(2)
  if slice_name not in TOPOLOGIES:
    raise ValueError(f'unknown --topology={name!r}; known: {", ".join(TOPOLOGIES)} '
                     "(prefix 'Nx' for N slices, e.g. 2xv4-8)")
  slices = int(prefix) if prefix else (num_slices or 1)
  if prefix and num_slices not in (None, slices):
    raise ValueError(f'--topology={name!r} says {slices} slices but --num_slices={num_slices}')
  if slices < 1:
    raise ValueError(f'--topology={name!r}: the number of slices must be at least 1')
  generation, grid = TOPOLOGIES[slice_name]
  return Topology(name=name, slice_name=slice_name, chip=CHIPS[generation], grid=grid,
                  num_slices=slices)


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
  """Holds back libtpu's C++ stderr chatter (no TPU metadata server here); replays it on error."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      tmp.seek(0)
      sys.stderr.write(tmp.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology_devices(topo: Topology) -> list[jax.Device]:
  """Compile-only devices of the slice(s); multislice devices carry slice_index."""
  kwargs = {'chip_config_name': 'megacore'} if topo.chip.megacore else {}
  if topo.num_slices > 1:
    kwargs['num_slices'] = topo.num_slices
  # Without a metadata server libtpu would log a multi-line error about worker
  # hostnames; this process only compiles, so it is one local worker. Nor does
  # it open a chip, so several fit checks (parallel tests, benchmarks/) may
  # share libtpu's one-process-per-host lock.
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  with _quiet_fd2():
    desc = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform='tpu',
                                        **kwargs)
  return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device (= per chip: v4 and v5p run megacore) from the buffer assignment."""
  arguments: int
  outputs: int
  temporaries: int
  generated_code: int
  aliased: int  # outputs written into donated arguments: counted once, not twice

  @property
  def total(self) -> int:
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.generated_code)


@dataclasses.dataclass(frozen=True)
class FitReport:
  topology: str
  libtpu_topology: str
  num_slices: int
  num_devices: int
  device_kind: str
  hbm_gib_per_chip: float
  variant: str
  remat: str
  compute_dtype: str
  param_dtype: str
  optimizer: str
  batch_size: int
  max_len: int
  grad_accum_steps: int
  mesh: dict[str, int]
  params: int  # the whole model's
  trained_params: int  # LoRA: the adapters only
  lora_rank: int
  memory: Memory
  flops_per_step: float  # compiled, all devices
  flops_model: float  # 6 x params x tokens; 4 x with LoRA (no frozen-weight gradients)
  collectives: dict[str, hlo.Collective]
  compile_s: float

  @property
  def tokens(self) -> int:
    return self.batch_size * self.max_len

  @property
  def total_gib(self) -> float:
    return self.memory.total / GIB

  @property
  def fits(self) -> bool:
    return self.memory.total <= self.hbm_gib_per_chip * GIB

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out['memory']['total'] = self.memory.total
    out.update(tokens=self.tokens, fits=self.fits, total_gib=self.total_gib,
               flops_per_token=self.flops_per_step / self.tokens)
    return out


def _vocab_size(config: ml_collections.ConfigDict) -> int:
  """The variant's vocabulary; a tiny variant's comes from its tokenizer (read if present)."""
  model_lib.check_variant(config.model.variant)
  cfg = model_lib.VARIANTS[config.model.variant]()
  if cfg.num_embed is not None:
    return cfg.num_embed
  if config.tokenizer.path and os.path.exists(config.tokenizer.path):
    from mtnt_tpu import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    return tokenizer_lib.Tokenizer(config.tokenizer.path).vocab_size
  raise ValueError(f'{config.model.variant} takes its vocabulary from the tokenizer; '
                   'set config.tokenizer.path to a SentencePiece model')


def fit_check(config: ml_collections.ConfigDict, topo: Topology,
              devices: Sequence[jax.Device]) -> FitReport:
  """Builds the run over `devices`, compiles its train step and measures it.

  Raises train.ConfigError for a config the trainer would refuse. A compile
  that runs out of HBM raises jax.errors.JaxRuntimeError (RESOURCE_EXHAUSTED).
  """
  run = train.build_without_files(config, devices, _vocab_size(config))
  t0 = time.perf_counter()
  compiled = train.lower_steps(run).train.compile()
  compile_s = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_params))
  trained = sum(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_state.params))
  c = config
  return FitReport(
      topology=topo.name, libtpu_topology=topo.libtpu_name, num_slices=topo.num_slices,
      num_devices=run.mesh.size, device_kind=devices[0].device_kind,
      hbm_gib_per_chip=topo.chip.hbm_gib, variant=c.model.variant, remat=c.model.remat,
      compute_dtype=c.model.compute_dtype, param_dtype=c.model.param_dtype,
      optimizer=c.optim.name, batch_size=c.train.batch_size, max_len=c.data.max_len,
      grad_accum_steps=c.optim.grad_accum_steps,
      mesh={k: int(v) for k, v in run.mesh.shape.items()}, params=params,
      trained_params=trained, lora_rank=int(c.lora.rank),
      memory=Memory(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                    temporaries=mem.temp_size_in_bytes,
                    generated_code=mem.generated_code_size_in_bytes,
                    aliased=mem.alias_size_in_bytes),
      # cost_analysis describes one device's partitioned program.
      flops_per_step=float(cost.get('flops', 0.0)) * run.mesh.size,
      flops_model=(4.0 if run.lora else 6.0) * params * c.train.batch_size * c.data.max_len,
      collectives=hlo.collectives(compiled.as_text()), compile_s=compile_s)


def _size(n: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if abs(n) >= scale:
      return f'{n / scale:8.2f} {unit}'
  return f'{n:8.0f} B  '


def format_report(r: FitReport) -> str:
  m = r.memory
  lines = [
      f'fit check: {r.variant} on {r.topology} ({r.libtpu_topology}'
      f'{f" x {r.num_slices} slices" if r.num_slices > 1 else ""}, {r.num_devices} x '
      f'{r.device_kind}), compiled in {r.compile_s:.0f}s',
      f'  config: batch {r.batch_size} x max_len {r.max_len} = {r.tokens} tokens, '
      f'remat={r.remat}, compute_dtype={r.compute_dtype}, param_dtype={r.param_dtype}, '
      f'optimizer={r.optimizer}, grad_accum_steps={r.grad_accum_steps}, mesh={r.mesh}',
      f'  params: {r.params:,}' + (f' ({r.trained_params:,} trained: LoRA rank {r.lora_rank})'
                                   if r.lora_rank else ''),
      '  memory per chip:',
      f'    arguments       {_size(m.arguments)}   (state and batch)',
      f'    outputs         {_size(m.outputs)}',
      f'    aliased         {_size(-m.aliased)}   (donated state reused for the new state)',
      f'    temporaries     {_size(m.temporaries)}   (activations, gradients, gathered weights)',
      f'    generated code  {_size(m.generated_code)}',
      f'    total           {_size(m.total)}   of {r.hbm_gib_per_chip:g} GiB HBM '
      f'({100 * m.total / (r.hbm_gib_per_chip * GIB):.0f}%): '
      f'{"fits" if r.fits else "DOES NOT FIT"}',
      f'  FLOPs per step: {r.flops_per_step:.3e} compiled vs {4 if r.lora_rank else 6}*N*T '
      f'{r.flops_model:.3e} '
      f'(x{r.flops_per_step / r.flops_model:.2f}); {r.flops_per_step / r.tokens:.3e} per token'
      + ('; XLA counts a loop body once (gradient accumulation, matmuls looped over '
         'shards), so this is low' if r.flops_per_step < 0.95 * r.flops_model else ''),
      '  collectives per device (static count in the HLO):',
  ]
  for op, col in r.collectives.items():
    lines.append(f'    {op:<20} {col.count:5d} ops  {_size(col.bytes)}')
  if not r.collectives:
    lines.append('    none')
  return '\n'.join(lines)


def advice(config: ml_collections.ConfigDict) -> str:
  """What to change when a config does not fit, most effective first."""
  c = config
  tips = [f'lower config.train.batch_size (now {c.train.batch_size}) or raise '
          f'config.optim.grad_accum_steps (now {c.optim.grad_accum_steps})']
  if c.model.remat != 'block':
    tips.append(f'set config.model.remat=block (now {c.model.remat})')
  if c.model.compute_dtype != 'bfloat16':
    tips.append('set config.model.compute_dtype=bfloat16')
  tips.append(f'spread state over more chips (config.mesh.fsdp, now {c.mesh.fsdp}, '
              'or a larger --topology)')
  return '; '.join(tips)


def _fail(code: int, message: str) -> int:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  return code


def _write_json(obj: dict) -> None:
  if FLAGS.json:
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # A config override naming no field surfaces as ml_collections' lookup error.
    return _fail(USAGE_ERROR, 'bad flag: ' + str(e).replace('\\n', ' ').replace("\\'", "'"))
  if len(rest) > 1:
    return _fail(USAGE_ERROR, f'unexpected arguments: {rest[1:]}')
  if FLAGS.config is None or not FLAGS.topology:
    return _fail(USAGE_ERROR, 'usage: python -m mtnt_tpu.aot --config CONFIG.py '
                 f'--topology {{{",".join(TOPOLOGIES)}}} [--json OUT]')
  # The CPU runs everything but the TPU compile: no local TPU is opened, even
  # on a TPU VM. Must precede the first backend use.
  jax.config.update('jax_platforms', 'cpu')
  try:
    config = FLAGS.config
    config.model.variant  # pylint: disable=pointless-statement  # loads the file lazily
  except OSError as e:
    return _fail(USAGE_ERROR, e)
  try:
    topo = parse_topology(FLAGS.topology, FLAGS.num_slices)
  except ValueError as e:
    return _fail(USAGE_ERROR, e)
  if topo.num_slices > 1 and config.mesh.dcn_data == 1:
    # A multislice topology fixes the DCN axis; leaving it 1 would spread fsdp
    # over the slow network.
    config.mesh.dcn_data = topo.num_slices
  devices = topology_devices(topo)
  try:
    report = fit_check(config, topo, devices)
  except (train.ConfigError, ValueError) as e:
    return _fail(USAGE_ERROR, e)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    message = (f'does not fit on {topo.name}: the TPU compiler ran out of HBM '
               f'({str(e).splitlines()[0][:300]}); {advice(config)}')
    _write_json({'topology': topo.name, 'fits': False, 'error': message})
    return _fail(DOES_NOT_FIT, message)
  print(format_report(report))
  _write_json(report.to_json())
  if not report.fits:
    return _fail(DOES_NOT_FIT, f'does not fit on {topo.name}: {report.total_gib:.2f} GiB per '
                 f'chip > {report.hbm_gib_per_chip:g} GiB HBM; {advice(config)}')
  return 0


def _main_or_crash() -> int:
  try:
    return main()
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return CRASHED


if __name__ == '__main__':
  define_flags()
  sys.exit(_main_or_crash())
