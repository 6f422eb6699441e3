"""CLI: parallel text -> ArrayRecord files + stats.json (see mtnt_tpu.data.prepare)."""

from absl import app

from mtnt_tpu.data.prepare import define_flags
from mtnt_tpu.data.prepare import main

if __name__ == '__main__':
  define_flags()
  app.run(main)
