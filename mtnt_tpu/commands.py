"""The project's commands in a child process, as a user runs them.

Tests and benchmarks start `python -m mtnt_tpu.<command>` this way, from a
source checkout (configs/ is beside the package, not in it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = 'configs/tiny_cpu.py'


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """This environment without XLA_FLAGS: a parent's faked device count (the
  test suite fakes 8) must not override the child's config.runtime.cpu_devices."""
  out = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out.update(extra or {})
  return out


def command(module: str, *args: str) -> list[str]:
  """`python -m mtnt_tpu.MODULE ARGS`."""
  return [sys.executable, '-m', f'mtnt_tpu.{module}', *map(str, args)]


def tiny_main(workdir: Any, *flags: str) -> list[str]:
  """`python -m mtnt_tpu.main --config configs/tiny_cpu.py --workdir W FLAGS`."""
  return command('main', '--config', TINY_CONFIG, '--workdir', str(workdir), *flags)


def run(cmd: list[str], *, extra_env: Mapping[str, str] | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs `cmd` from the checkout's root, output captured as text."""
  return subprocess.run(cmd, cwd=ROOT, env=env(extra_env), capture_output=True, text=True,
                        **kwargs)


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
  """Starts `cmd` from the checkout's root; stdout dropped, stderr piped as text."""
  return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, **kwargs)
