"""README's picture of the served page: a real headless Chromium on a trained workdir.

    uv run --extra test python benchmarks/screenshot.py --workdir /tmp/mtnt_tiny \
        [--out docs/serve.png] [--serve_flags=--cpu_devices=1]

Starts `python -m mtnt_tpu.serve --workdir WORKDIR` on loopback, opens its page
in Debian's headless Chromium (apt-get install chromium chromium-driver),
types a few sentences, presses Translate, waits for the translations and
saves the window as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtnt_tpu.serve import harness  # noqa: E402  (after the path)

SENTENCES = ('The cat sleeps on the red chair.', 'He reads my black book.',
             'There are no small trees under the car. They like the cake.')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', default='/tmp/mtnt_tiny')
  p.add_argument('--out', default=os.path.join(ROOT, 'docs', 'serve.png'))
  p.add_argument('--width', type=int, default=900)
  p.add_argument('--height', type=int, default=760)
  p.add_argument('--serve_flags', default='', help='extra flags for python -m mtnt_tpu.serve')
  args = p.parse_args()
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  with harness.serve(args.workdir, '--access_log=false', *args.serve_flags.split(),
                     cwd=ROOT) as server, \
       harness.chromium(args.width, args.height) as browser:
    browser.get(server.url)
    _wait(lambda: 'step' in browser.find_element(By.ID, 'model').text)
    browser.find_element(By.ID, 'source').send_keys('\n'.join(SENTENCES))
    browser.find_element(By.ID, 'translate').click()
    _wait(lambda: browser.find_element(By.ID, 'status').text.startswith('Done'))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + '.tmp.png'
    browser.save_screenshot(tmp)
    os.replace(tmp, args.out)  # never a half-written picture under the real name
  print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes)')


def _wait(condition, timeout_s: float = 120) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      sys.exit(f'the page did not finish within {timeout_s:.0f}s')
    time.sleep(0.1)


if __name__ == '__main__':
  main()
