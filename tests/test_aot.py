"""The fit check compiles the real train step for a TPU v4-8 on this CPU machine."""

import importlib.util
import json
import subprocess

import pytest

from mtnt_tpu import aot
from mtnt_tpu import commands
from mtnt_tpu import hlo

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed (uv sync --extra test); it compiles for TPUs')

# The tiny model on one v4-8 (4 chips), every chip in fsdp.
_TINY = ('--config', 'configs/tiny_cpu.py', '--config.mesh.data=1', '--config.mesh.fsdp=-1')


def _aot(*flags) -> subprocess.CompletedProcess:
  # A subprocess: the TPU plugin must not load into this 8-fake-CPU process.
  return commands.run(commands.command('aot', *flags), timeout=300)


def _error_line(proc) -> str:
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  return errors[0]


@needs_libtpu
@pytest.mark.slow
def test_tiny_model_fits_a_v4_8(tmp_path):
  out = tmp_path / 'report.json'
  proc = _aot(*_TINY, '--topology', 'v4-8', '--json', str(out))
  assert proc.returncode == 0, proc.stderr
  assert 'fits' in proc.stdout and 'all-gather' in proc.stdout
  r = json.loads(out.read_text())
  assert r['num_devices'] == 4 and r['device_kind'] == 'TPU v4' and r['fits']
  assert r['mesh'] == {'dcn_data': 1, 'data': 1, 'fsdp': 4}
  assert r['memory']['total'] > r['memory']['arguments'] > 0
  # Forward and backward matmuls, plus attention and the loss.
  assert 0.8 < r['flops_per_step'] / r['flops_model'] < 3, r
  assert sum(c['count'] for c in r['collectives'].values()) > 0
  assert r['remat'] == 'none' and r['compute_dtype'] == 'float32'


@needs_libtpu
@pytest.mark.slow
def test_absurd_batch_does_not_fit():
  proc = _aot(*_TINY, '--topology', 'v4-8', '--config.train.batch_size=1048576')
  assert proc.returncode == aot.DOES_NOT_FIT, proc.stderr
  line = _error_line(proc)
  assert 'does not fit on v4-8' in line and 'config.train.batch_size' in line


@needs_libtpu
@pytest.mark.slow
def test_mesh_that_does_not_divide_the_slice_is_a_usage_error():
  proc = _aot(*_TINY, '--topology', 'v4-8', '--config.mesh.data=3')
  assert proc.returncode == aot.USAGE_ERROR, proc.stderr
  assert 'config.mesh' in _error_line(proc)


@pytest.mark.slow
def test_unknown_topology_lists_the_known_ones():
  proc = _aot(*_TINY, '--topology', 'v9-8')
  assert proc.returncode == aot.USAGE_ERROR, proc.stderr
  line = _error_line(proc)
  assert "'v9-8'" in line and 'v4-8' in line and 'v4-128' in line


def test_parse_topology():
  t = aot.parse_topology('2xv4-8')
  assert (t.libtpu_name, t.num_slices, t.chip.hbm_gib) == ('v4:2x2x1', 2, 32)
  assert aot.parse_topology('v4-128', num_slices=3).num_slices == 3
  with pytest.raises(ValueError, match='--num_slices=3'):
    aot.parse_topology('2xv4-8', num_slices=3)


def test_collectives_counts_ops_and_result_bytes():
  text = '\n'.join([
      '  %all-gather.1 = bf16[8,2048,256]{2,1,0:T(8,128)(2,1)} all-gather(%p), dimensions={1}',
      '  %ags = (f32[4], f32[16]) all-gather-start(%q), dimensions={0}',
      '  %agd = f32[16]{0} all-gather-done(%ags)',
      '  ROOT %ar = (f32[2,3], bf16[4]) all-reduce(%a, %b), to_apply=%add',
      '  %fusion = f32[4] fusion(%all-reduce.2), kind=kLoop',
  ])
  got = hlo.collectives(text)
  assert got == {'all-gather': hlo.Collective(2, 8 * 2048 * 256 * 2 + 16 * 4),
                 'all-reduce': hlo.Collective(1, 6 * 4 + 4 * 2)}
