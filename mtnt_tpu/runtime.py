"""Process-level set-up: devices, the distributed runtime, the compilation
cache, the preemption signal, and the profiler."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging as logging_std
import os
import signal
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process sits; all None means 'detect' (Cloud TPU) or 'alone'."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300


def _on_cloud_tpu_vm() -> bool:
  # TPU VMs expose the chips as /dev/accel* (v2-v4) or /dev/vfio/N (v5e+).
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


class _QuietLibraries(logging_std.Filter):

  def __init__(self, min_level: int, libraries: tuple[str, ...]):
    super().__init__()
    self._min_level = min_level
    self._dirs = tuple(f'{os.sep}{lib}{os.sep}' for lib in libraries)

  def filter(self, record):
    return record.levelno >= self._min_level or not any(d in record.pathname for d in self._dirs)


def quiet_libraries(min_level: int, libraries: tuple[str, ...] = ('orbax', 'grain')) -> None:
  """Drops the libraries' log records below `min_level` from absl's log."""
  logging.get_absl_handler().addFilter(_QuietLibraries(min_level, libraries))


def start(cpu_devices: int, cluster: Cluster) -> None:
  """Fakes CPU devices if asked, then joins the other processes if there are any.

  Must run before anything touches a JAX backend. Raises RuntimeError with one
  line when the coordinator does not answer within the timeout.
  """
  if cpu_devices:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  explicit = cluster.coordinator_address is not None
  if explicit and (cluster.num_processes is None or cluster.process_id is None):
    raise RuntimeError('--coordinator_address needs --num_processes and --process_id')
  if not explicit and not (_on_cloud_tpu_vm() and not cpu_devices):
    return  # one process: nothing to join
  if explicit and cluster.process_id != 0:
    # JAX aborts the whole process (uncatchable) when the coordinator never
    # answers; a plain TCP probe first turns that into one clear line.
    _wait_for_coordinator(cluster.coordinator_address, cluster.timeout_s)
  if cpu_devices and (cluster.num_processes or 1) > 1:
    # CPU collectives across processes go over gloo (TCP on the coordinator's network).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('joining %s processes via %s (waiting up to %ds)', cluster.num_processes or 'all',
               cluster.coordinator_address or 'the Cloud TPU metadata', cluster.timeout_s)
  try:
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes, process_id=cluster.process_id,
        initialization_timeout=cluster.timeout_s)
  except Exception as e:  # noqa: BLE001 - the runtime raises several kinds
    where = cluster.coordinator_address or 'the Cloud TPU metadata'
    raise RuntimeError(
        f'could not join the other processes via {where} within {cluster.timeout_s}s '
        f'({type(e).__name__}); check that every host runs the same command and that '
        'process 0 is reachable on that address and port') from e


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f'the coordinator {address} did not answer within {timeout_s}s ({e}); start '
            'process 0 there, or fix --coordinator_address') from None
      time.sleep(0.5)


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
  """JAX's persistent compilation cache: a rerun skips most of its compile time."""
  if setting == 'off':
    return None
  path = setting or os.path.join(workdir, 'jax_cache')
  jax.config.update('jax_compilation_cache_dir', path)
  # Cache every program, not only the slow ones: the tiny config's steps
  # compile in seconds but a rerun should still skip them.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


class Preempted(Exception):
  """A SIGTERM arrived inside `Preemption.interruptible()`."""


class Preemption:
  """Says at which step every process should save and stop.

  One process: SIGTERM (what a spot or maintenance-evicted TPU VM receives,
  some 30 s before it goes) sets a flag, and the step in flight finishes
  first; inside `interruptible()` (an eval) it raises Preempted at once, so
  the save never waits for an eval. Several: JAX's coordination service
  turns any host's SIGTERM into one agreed step
  (`reached_preemption_sync_point`), so every host saves the same step; an
  eval is not cut short there (the hosts would stop in different places).
  """

  def __init__(self):
    self._received = False
    self._interruptible = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving as soon as the step in flight ends, then exiting')
    self._received = True
    if self._interruptible:
      self._interruptible = False
      raise Preempted()

  @contextlib.contextmanager
  def interruptible(self):
    """Work a SIGTERM may cut short with Preempted: only what can be dropped whole."""
    if self._received:
      raise Preempted()
    self._interruptible = True
    try:
      yield
    finally:
      self._interruptible = False

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self) -> None:
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


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
