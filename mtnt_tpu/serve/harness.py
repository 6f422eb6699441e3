"""The server as a child process, and a headless Chromium to drive its page.

What the tests, benchmarks/serve_load.py and benchmarks/screenshot.py share:
each starts `python -m mtnt_tpu.serve` the way a user does, on loopback with
a free port, and waits (bounded) for the URL it prints once it is ready.
Chromium is Debian's `chromium` with `chromium-driver`; selenium (the test
extra) is imported only when a browser is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

_READY = re.compile(r' at (http://\S+/)$', re.M)


class ServerFailed(RuntimeError):
  """The child server exited or never became ready; the message holds its log's tail."""


@dataclasses.dataclass
class Server:
  url: str
  process: subprocess.Popen
  log_path: str

  def log(self) -> str:
    with open(self.log_path, encoding='utf-8', errors='replace') as f:
      return f.read()


@contextlib.contextmanager
def serve(workdir: str, *flags: str, ready_timeout_s: float = 600, cwd: str | None = None
          ) -> Iterator[Server]:
  """`python -m mtnt_tpu.serve --workdir WORKDIR --port 0 FLAGS`, stopped on exit."""
  log = tempfile.NamedTemporaryFile('w', prefix='mtnt_serve_', suffix='.log', delete=False)
  # The workdir's config fakes CPU devices where it trained on them; a parent's
  # XLA_FLAGS (the test suite's 8 devices) must not leak in.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'mtnt_tpu.serve', '--workdir', str(workdir), '--host',
       '127.0.0.1', '--port', '0', *flags],
      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
  log.close()
  server = Server('', proc, log.name)
  try:
    server.url = _wait_ready(server, ready_timeout_s)
    yield server
  finally:
    stop(proc)
    with contextlib.suppress(OSError):
      os.unlink(log.name)


def _wait_ready(server: Server, timeout_s: float) -> str:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if server.process.poll() is not None:
      raise ServerFailed(f'the server exited with {server.process.returncode}:\n'
                         f'{server.log()[-3000:]}')
    m = _READY.search(server.log())
    if m:
      try:
        with urllib.request.urlopen(m.group(1) + 'healthz', timeout=10) as r:
          if r.status == 200:
            return m.group(1)
      except OSError:
        pass  # listening, but uvicorn is still starting
    time.sleep(0.2)
  raise ServerFailed(f'the server was not ready in {timeout_s:.0f}s:\n{server.log()[-3000:]}')


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> int:
  """SIGINT (uvicorn's graceful stop), then SIGKILL if it hangs."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  return proc.returncode


class BrowserMissing(RuntimeError):
  """No Chromium or chromedriver on PATH."""


@contextlib.contextmanager
def chromium(width: int = 1100, height: int = 800) -> Iterator:
  """A headless Chromium under selenium, with a fresh profile, quit on exit."""
  binary = shutil.which('chromium') or shutil.which('chromium-browser')
  driver = shutil.which('chromedriver')
  if not binary or not driver:
    raise BrowserMissing('chromium and chromedriver are not both on PATH; install them: '
                         'apt-get install chromium chromium-driver')
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix='mtnt_chromium_') as profile:
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                '--no-first-run', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
                f'--user-data-dir={profile}', f'--window-size={width},{height}'):
      options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
      browser.set_page_load_timeout(60)
      browser.set_script_timeout(60)
      yield browser
    finally:
      browser.quit()
