"""python -m mtnt_tpu.main --config configs/v4_8.py --workdir DIR [--config.train.num_steps=N]

On a multi-host TPU slice every host runs the same command; the hosts find
each other through the TPU metadata. Elsewhere pass --coordinator_address,
--num_processes and --process_id (the same address on every process).
"""

import logging as logging_std
import re

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mtnt_tpu import runtime
from mtnt_tpu import train
from mtnt_tpu import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; only when run as a program, so importing defines none."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here '
                      '(a local path or gs://bucket/path).')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for multi-process runs off Cloud TPU.')
  flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
  flags.DEFINE_integer('distributed_timeout', 300,
                       'Seconds to wait for the other processes before giving up.')
  flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a --config.x.y naming no field as one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' locked-config lookup
    name = re.match(r'[\\\'"]*(\w*)', str(e)).group(1)
    guess = re.search(r'Did you mean \\?"(\w+)\\?"', str(e))
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.')
                 and name in a.split('=')[0].split('.')), f'--config.*.{name}')
    raise SystemExit(f'error: {flag}: the config has no field {name!r}; '
                     + (f'did you mean {guess.group(1)!r}?' if guess else
                        'see configs/common.py for the fields')) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runtime.quiet_libraries(logging_std.WARNING)  # orbax's and Grain's per-save INFO chatter
  config = FLAGS.config
  try:
    runtime.start(config.runtime.cpu_devices, runtime.Cluster(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        FLAGS.distributed_timeout))
  except RuntimeError as e:
    raise SystemExit(f'error: {e}') from None
  logging.info('JAX %s, process %d of %d, %d local / %d global devices (%s)',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    train.train_and_evaluate(config, workdir_lib.resolve(FLAGS.workdir))
  except (train.ConfigError, FloatingPointError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
