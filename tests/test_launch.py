"""The launch/*.sh scripts, by dry run: the gcloud commands they print, their
argument errors, and shellcheck. gcloud is never really called: a fake one on
PATH records every call, and a dry run must leave it uncalled."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ['create.sh', 'setup.sh', 'train.sh', 'logs.sh', 'stop.sh', 'delete.sh']
SHELLCHECK = Path(sys.executable).parent / 'shellcheck'

NAME = 'mtnt-test'
ZONE = 'us-central2-b'
LOC = ['--name', NAME, '--zone', ZONE]
SSH = f'gcloud compute tpus tpu-vm ssh {NAME} --zone={ZONE} --worker=all --command='
SEP = '\x1f'  # between the arguments of one recorded gcloud call

# Records each call as one line, its arguments joined by SEP; exits with
# $FAKE_GCLOUD_RC (1 unless a test says otherwise).
FAKE_GCLOUD = f"""#!/usr/bin/env bash
IFS=$'{SEP}'
printf '%s\\n' "$*" >>"$FAKE_GCLOUD_LOG"
exit "${{FAKE_GCLOUD_RC:-1}}"
"""


class Launch:
  """Runs launch scripts with a fake gcloud first on PATH."""

  def __init__(self, tmp: Path):
    self.tmp = tmp
    bin_dir = tmp / 'bin'
    bin_dir.mkdir()
    gcloud = bin_dir / 'gcloud'
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    self.log = tmp / 'gcloud_calls'
    self.env = {
        **os.environ,
        'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
        'FAKE_GCLOUD_LOG': str(self.log),
        'TMPDIR': str(tmp),
    }
    self.env.pop('FAKE_GCLOUD_RC', None)

  def __call__(self, script: str, *args: str, ok: bool = True, stdin=subprocess.DEVNULL,
               gcloud_rc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ['bash', str(LAUNCH / script), *args], cwd=self.tmp, env={
            **self.env, 'FAKE_GCLOUD_RC': str(gcloud_rc)}, stdin=stdin,
        capture_output=True, text=True, timeout=20)
    if ok:
      assert proc.returncode == 0, proc.stderr
    return proc

  def dry(self, script: str, *args: str) -> list[str]:
    """Dry-runs a script; returns its stdout lines, checking gcloud stayed uncalled."""
    proc = self(script, '--dry-run', *args)  # before any '--'
    assert self.calls() == [], 'a dry run called gcloud'
    lines = proc.stdout.splitlines()
    assert lines, 'a dry run printed no command'
    return lines

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [line.split(SEP) for line in self.log.read_text().splitlines()]

  def clear(self):
    self.log.unlink(missing_ok=True)


@pytest.fixture
def launch(tmp_path):
  return Launch(tmp_path)


def ssh_command(line: str) -> str:
  """The --command text of a printed `gcloud ... ssh` line."""
  words = shlex.split(line)
  [command] = [w[len('--command='):] for w in words if w.startswith('--command=')]
  return command


# create.sh


@pytest.mark.parametrize('accel, hosts', [('v4-8', '1 host'), ('v4-32', '4 hosts')])
def test_create_on_demand(launch, accel, hosts):
  proc = launch('create.sh', *LOC, '--accelerator-type', accel, '--dry-run')
  assert proc.stdout.splitlines() == [
      f'gcloud compute tpus tpu-vm create {NAME} --zone={ZONE} '
      f'--accelerator-type={accel} --version=tpu-ubuntu2204-base']
  assert f'{accel} has {hosts}' in proc.stderr
  assert launch.calls() == []


@pytest.mark.parametrize('accel', ['v4-8', 'v4-32'])
def test_create_spot_and_queued(launch, accel):
  [spot] = launch.dry('create.sh', *LOC, f'--accelerator-type={accel}', '--spot')
  assert spot == (f'gcloud compute tpus tpu-vm create {NAME} --zone={ZONE} '
                  f'--accelerator-type={accel} --version=tpu-ubuntu2204-base --spot')

  [queued] = launch.dry('create.sh', *LOC, '--accelerator-type', accel, '--queued')
  assert queued == (f'gcloud compute tpus queued-resources create {NAME} --node-id={NAME} '
                    f'--zone={ZONE} --accelerator-type={accel} '
                    f'--runtime-version=tpu-ubuntu2204-base')

  [both] = launch.dry('create.sh', *LOC, '--accelerator-type', accel, '--queued', '--spot')
  assert both == queued + ' --spot'


def test_create_options(launch):
  [line] = launch.dry('create.sh', *LOC, '--accelerator-type', 'v4-16', '--project', 'my-proj',
                      '--runtime-version', 'tpu-vm-v4-base', '--', '--network=my-net')
  assert line == (f'gcloud compute tpus tpu-vm create {NAME} --zone={ZONE} --project=my-proj '
                  '--accelerator-type=v4-16 --version=tpu-vm-v4-base --network=my-net')
  [line] = launch.dry('create.sh', f'--name={NAME}', f'--zone={ZONE}',
                      '--accelerator-type=v5litepod-16')
  assert '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite' in line


@pytest.mark.parametrize('accel, hosts', [
    ('v4-8', 1), ('v4-16', 2), ('v4-32', 4), ('v4-128', 16), ('v5p-8', 1), ('v5p-32', 4),
    ('v5litepod-8', 1), ('v5litepod-16', 4), ('v6e-4', 1), ('v6e-64', 16)])
def test_create_counts_hosts(launch, accel, hosts):
  proc = launch('create.sh', *LOC, '--accelerator-type', accel, '--dry-run')
  word = 'host' if hosts == 1 else 'hosts'
  assert f'{accel} has {hosts} {word}' in proc.stderr


# setup.sh


def test_setup_copies_checkout(launch):
  lines = launch.dry('setup.sh', *LOC, '--data', 'gs://my-bucket/mtnt/',
                     '--gemma', 'gs://my-bucket/gemma-2b')
  tarball = f'{launch.tmp}/mtnt_tpu-{NAME}.tar.gz'
  assert lines == [
      f'git -C {REPO} archive --format=tar.gz --output={tarball} HEAD',
      f'gcloud compute tpus tpu-vm scp {tarball} {NAME}:mtnt_tpu.tar.gz --zone={ZONE} '
      '--worker=all',
      SSH + "'mkdir -p ~/mtnt_tpu && tar -xzf mtnt_tpu.tar.gz -C ~/mtnt_tpu"
      " && rm mtnt_tpu.tar.gz'",
      f'rm -f {tarball}',
      SSH + "'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv"
      " && cd ~/mtnt_tpu && ~/.local/bin/uv sync --locked --extra tpu'",
      SSH + '\'mkdir -p ~/data && gcloud storage cp -r "gs://my-bucket/mtnt/*" ~/data/\'',
      SSH + '\'mkdir -p ~/gemma-2b && gcloud storage cp -r "gs://my-bucket/gemma-2b/*"'
      ' ~/gemma-2b/\'',
  ]
  assert not Path(tarball).exists(), 'a dry run made the tarball'


def test_setup_from_git_without_data(launch):
  lines = launch.dry('setup.sh', *LOC, '--repo', 'https://example.com/mtnt_tpu.git',
                     '--ref', 'v1')
  assert len(lines) == 2
  assert all(line.startswith(SSH) for line in lines)
  assert ('git fetch -q --depth=1 https://example.com/mtnt_tpu.git v1 && '
          'git checkout -q --force --detach FETCH_HEAD') in ssh_command(lines[0])
  assert 'uv sync --locked --extra tpu' in ssh_command(lines[1])
  assert not any('scp' in line or 'storage' in line for line in lines)


# train.sh


@pytest.mark.parametrize('accel', ['v4-8', 'v4-32'])
def test_train(launch, accel):
  [_, line] = launch.dry('train.sh', *LOC, '--accelerator-type', accel,
                      '--workdir', 'gs://my-bucket/runs/1', '--',
                      '--config.data.dir=~/data', '--config.train.num_steps=100')
  assert line.startswith(SSH)
  command = ssh_command(line)
  assert command.startswith('cd ~/mtnt_tpu ')
  assert ('setsid nohup .venv/bin/python -m mtnt_tpu.main --config=configs/v4_8.py '
          '--workdir=gs://my-bucket/runs/1 --config.data.dir="$HOME"/data '
          '--config.train.num_steps=100 >train.log 2>&1 </dev/null &') in command
  subprocess.run(['bash', '-n', '-c', command], check=True)


def test_train_config_and_local_workdir_on_one_host(launch):
  [_, line] = launch.dry('train.sh', *LOC, '--accelerator-type=v4-8', '--config',
                      'configs/tiny_cpu.py', '--workdir', '/tmp/run')
  assert '-m mtnt_tpu.main --config=configs/tiny_cpu.py --workdir=/tmp/run >' in line
  # gs:// needs no accelerator type: the slice's size does not matter.
  [_, line] = launch.dry('train.sh', *LOC, '--workdir=gs://b/r')
  assert '--workdir=gs://b/r >train.log' in line


def test_train_starts_no_worker_while_any_worker_is_training(launch):
  [check, start] = launch.dry('train.sh', *LOC, '--workdir=gs://b/r')
  assert 'already training' in check and 'nohup' not in check
  assert 'already training' not in start
  # One worker refusing fails the check (gcloud exits 1): nothing is started.
  proc = launch('train.sh', *LOC, '--workdir=gs://b/r', ok=False, gcloud_rc=1)
  assert proc.returncode != 0
  [call] = launch.calls()
  assert 'already training' in call[-1] and 'nohup' not in call[-1]


def test_train_asks_gcloud_for_the_type_of_a_local_workdir_slice(launch):
  proc = launch('train.sh', *LOC, '--workdir', '/tmp/run', ok=False)
  assert proc.returncode != 0
  assert launch.calls()[0][:5] == ['compute', 'tpus', 'tpu-vm', 'describe', NAME]


# logs.sh, stop.sh, delete.sh


def test_logs(launch):
  [line] = launch.dry('logs.sh', *LOC)
  assert line == (f'gcloud compute tpus tpu-vm ssh {NAME} --zone={ZONE} --worker=0 '
                  "--command='tail -n 100 -F ~/mtnt_tpu/train.log'")
  [line] = launch.dry('logs.sh', *LOC, '--worker', '3', '--lines', '20', '--no-follow')
  assert line.endswith("--worker=3 --command='tail -n 20 ~/mtnt_tpu/train.log'")
  [line] = launch.dry('logs.sh', *LOC, '--worker=all')
  assert line.startswith(SSH)
  assert 'tail -n 100 -F ~/mtnt_tpu/train.log' in ssh_command(line)


def test_stop(launch):
  [line] = launch.dry('stop.sh', *LOC)
  assert line.startswith(SSH)
  command = ssh_command(line)
  assert re.search(r'pkill -TERM -o -f "[^"]*mtnt_tpu\[\.\]main"', command)
  subprocess.run(['bash', '-n', '-c', command], check=True)
  [line] = launch.dry('stop.sh', *LOC, '--wait')
  assert 'while pgrep -f' in line


def test_process_pattern_finds_the_trainer_not_the_shell(launch):
  [line] = launch.dry('stop.sh', *LOC)
  pattern = re.search(r'pkill -TERM -o -f "([^"]*)"', ssh_command(line)).group(1)
  [check, train] = launch.dry('train.sh', *LOC, '--workdir=gs://b/r')
  shell = 'bash -c ' + ssh_command(train)  # how sshd runs it: pgrep must skip it
  trainer = '.venv/bin/python -m mtnt_tpu.main --config=configs/v4_8.py --workdir=gs://b/r'
  uv_child = '/home/me/mtnt_tpu/.venv/bin/python3 -m mtnt_tpu.main --workdir=gs://b/r'
  matches = subprocess.run(['grep', '-E', pattern], input='\n'.join(
      [shell, trainer, uv_child, 'bash -c ' + ssh_command(line), 'bash -c ' + ssh_command(check),
       'vim mtnt_tpu/main.py']) + '\n',
      capture_output=True, text=True).stdout.splitlines()
  assert matches == [trainer, uv_child]


def test_delete(launch):
  [line] = launch.dry('delete.sh', *LOC)
  assert line == f'gcloud compute tpus tpu-vm delete {NAME} --zone={ZONE} --quiet'
  [line] = launch.dry('delete.sh', *LOC, '--queued')
  assert line == f'gcloud compute tpus queued-resources delete {NAME} --zone={ZONE} --force --quiet'


# The worker-side commands, run here in a fake home.


def worker_shell(launch: Launch, command: str, **kwargs) -> subprocess.CompletedProcess:
  """Runs an ssh --command text as sshd would, with HOME in tmp and a pgrep that
  sees no trainer (the real one could see someone else's)."""
  home = launch.tmp / 'home'
  fake_bin = launch.tmp / 'worker_bin'
  fake_bin.mkdir(exist_ok=True)
  (fake_bin / 'pgrep').write_text('#!/bin/sh\nexit 1\n')
  (fake_bin / 'pgrep').chmod(0o755)
  env = {**launch.env, 'HOME': str(home), 'PATH': f'{fake_bin}{os.pathsep}{launch.env["PATH"]}',
         'MTNT_START_CHECK_S': '1'}
  return subprocess.run(['bash', '-c', command], cwd=home, env=env, capture_output=True,
                        text=True, timeout=20, **kwargs)


def test_worker_unpacks_the_tarball(launch):
  lines = launch.dry('setup.sh', *LOC)
  home = launch.tmp / 'home'
  home.mkdir()
  subprocess.run(['git', '-C', str(REPO), 'archive', '--format=tar.gz',
                  f'--output={home / "mtnt_tpu.tar.gz"}', 'HEAD'], check=True)
  [unpack] = [ssh_command(line) for line in lines if 'tar -xzf' in line]
  proc = worker_shell(launch, unpack)
  assert proc.returncode == 0, proc.stderr
  assert (home / 'mtnt_tpu' / 'pyproject.toml').is_file()
  assert not (home / 'mtnt_tpu.tar.gz').exists()


def test_worker_starts_the_trainer_detached(launch):
  home = launch.tmp / 'home'
  venv_bin = home / 'mtnt_tpu' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  # A stand-in trainer that writes its arguments where the test can read them.
  (venv_bin / 'python').write_text(
      '#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$HOME/argv.tmp"; mv "$HOME/argv.tmp" "$HOME/argv"\n'
      'echo trainer-output\nexec sleep 3\n')
  (venv_bin / 'python').chmod(0o755)
  (home / 'mtnt_tpu' / 'train.log').write_text('old run\n')
  note = "it's ~/here & $HOME"
  [_, line] = launch.dry('train.sh', *LOC, '--workdir', 'gs://b/r', '--',
                      '--config.data.dir=~/data', f'--config.note={note}')
  proc = worker_shell(launch, ssh_command(line))
  assert proc.returncode == 0, proc.stderr
  assert 'started pid' in proc.stdout
  argv = home / 'argv'
  for _ in range(200):
    if argv.exists():
      break
    time.sleep(0.025)
  assert argv.read_text().splitlines() == [
      '-m', 'mtnt_tpu.main', '--config=configs/v4_8.py', '--workdir=gs://b/r',
      f'--config.data.dir={home}/data', f'--config.note={note}']
  assert (home / 'mtnt_tpu' / 'train.log.prev').read_text() == 'old run\n'
  for _ in range(200):
    if (home / 'mtnt_tpu' / 'train.log').read_text():
      break
    time.sleep(0.025)
  assert (home / 'mtnt_tpu' / 'train.log').read_text() == 'trainer-output\n'


def test_worker_reports_a_trainer_that_dies_at_once(launch):
  venv_bin = launch.tmp / 'home' / 'mtnt_tpu' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True, exist_ok=True)
  (venv_bin / 'python').write_text('#!/usr/bin/env bash\necho "error: bad config"; exit 1\n')
  (venv_bin / 'python').chmod(0o755)
  [_, line] = launch.dry('train.sh', *LOC, '--workdir', 'gs://b/r')
  proc = worker_shell(launch, ssh_command(line))
  assert proc.returncode == 1 and 'started pid' not in proc.stdout
  assert 'the trainer exited in its first seconds' in proc.stderr
  assert 'error: bad config' in proc.stderr


def test_worker_log_lines_name_their_host(launch):
  home = launch.tmp / 'home'
  (home / 'mtnt_tpu').mkdir(parents=True)
  (home / 'mtnt_tpu' / 'train.log').write_text(''.join(f'step {i}\n' for i in range(5)))
  [line] = launch.dry('logs.sh', *LOC, '--worker', 'all', '--lines', '2', '--no-follow')
  proc = worker_shell(launch, ssh_command(line))
  host = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
  assert proc.stdout.splitlines() == [f'{host}: step 3', f'{host}: step 4']


# What a dry run prints is what a real run runs.


@pytest.mark.parametrize('script, args', [
    ('create.sh', ['--accelerator-type', 'v4-32', '--queued', '--spot', '--project', 'p-1']),
    ('setup.sh', ['--data', 'gs://my-bucket/mtnt', '--gemma', 'gs://my-bucket/gemma-2b']),
    ('setup.sh', ['--repo', 'https://example.com/x.git']),
    ('train.sh', ['--workdir', 'gs://b/r', '--', "--config.note=it's ~/here & $HOME",
                  '--config.data.dir=~/data']),
    ('logs.sh', ['--worker', 'all']),
    ('stop.sh', ['--wait']),
    ('delete.sh', ['--yes']),
])
def test_printed_commands_paste_back_to_the_same_calls(launch, script, args):
  printed = launch(script, '--dry-run', *LOC, *args).stdout
  assert launch.calls() == []
  subprocess.run(['bash', '-euo', 'pipefail', '-c', printed], cwd=launch.tmp, env={
      **launch.env, 'FAKE_GCLOUD_RC': '0'}, check=True, timeout=20)
  pasted = launch.calls()
  launch.clear()
  launch(script, *LOC, *args, gcloud_rc=0)
  assert launch.calls() == pasted
  assert len(pasted) == sum(line.startswith('gcloud ') for line in printed.splitlines())


def test_readme_walkthrough_dry_runs(launch):
  """Every launch/ line of the README's v4-8 walkthrough works as written."""
  text = (LAUNCH / 'README.md').read_text()
  [block] = re.findall(r'```bash\n(.*?)```', text, re.S)
  block = block.replace('\\\n', ' ')
  lines = [line.split('  #')[0].strip() for line in block.splitlines()]
  lines = [line for line in lines if line.startswith('launch/')]
  assert [line.split()[0] for line in lines] == [
      'launch/create.sh', 'launch/setup.sh', 'launch/train.sh', 'launch/logs.sh',
      'launch/stop.sh', 'launch/delete.sh']
  env = {**launch.env, 'NAME': 'mtnt-v4-8', 'ZONE': ZONE, 'BUCKET': 'gs://my-mtnt-bucket'}
  printed = []
  for line in lines:
    script, rest = line.split(' ', 1)
    proc = subprocess.run(['bash', '-c', f'{REPO}/{script} --dry-run {rest}'], env=env,
                          cwd=launch.tmp, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    printed += proc.stdout.splitlines()
  assert launch.calls() == []
  assert printed[0] == ('gcloud compute tpus tpu-vm create mtnt-v4-8 --zone=us-central2-b '
                        '--accelerator-type=v4-8 --version=tpu-ubuntu2204-base')
  assert '--workdir=gs://my-mtnt-bucket/runs/v4-8 --config.data.dir="$HOME"/data >' in (
      '\n'.join(printed))


# Bad arguments: one line on stderr naming the fix, non-zero exit, no gcloud.


BAD = [
    ('create.sh', [*LOC, '--accelerator-type', 'v4-12'], "unknown accelerator type 'v4-12'"),
    ('create.sh', [*LOC, '--accelerator-type', 'v3-8'], "unknown accelerator type 'v3-8'"),
    ('create.sh', [*LOC, '--accelerator-type', 'v4'], "unknown accelerator type 'v4'"),
    ('create.sh', [*LOC, '--accelerator-type', 'v5litepod-3'], 'unknown accelerator type'),
    ('create.sh', LOC, 'missing --accelerator-type'),
    ('create.sh', [*LOC, '--accelerator-type'], '--accelerator-type needs a value'),
    ('create.sh', ['--zone', ZONE, '--accelerator-type', 'v4-8'], 'missing --name'),
    ('create.sh', ['--name', NAME, '--accelerator-type', 'v4-8'], 'missing --zone'),
    ('create.sh', [*LOC, '--accelerator-type', 'v4-8', '--preemptible'],
     "unknown option '--preemptible'"),
    ('create.sh', ['--name', 'My_TPU', '--zone', ZONE, '--accelerator-type', 'v4-8'],
     "bad --name 'My_TPU'"),
    ('setup.sh', ['--zone', ZONE], 'missing --name'),
    ('setup.sh', [*LOC, '--data', '/local/data'], '--data must be a gs:// folder'),
    ('setup.sh', [*LOC, '--ref', 'main'], '--ref needs --repo'),
    ('setup.sh', [*LOC, '--gemma', 'gs://my-bucket'], '--gemma must name a folder inside'),
    ('setup.sh', [*LOC, '--data', 'gs://b/my data'], '--data must be a gs:// folder'),
    ('train.sh', ['--zone', ZONE, '--workdir', 'gs://b/r'], 'missing --name'),
    ('train.sh', LOC, 'missing --workdir'),
    ('train.sh', [*LOC, '--workdir', 'gs://b/r', '--config', 'configs/v4_32.py'],
     '--config configs/v4_32.py is not a file of this checkout'),
    ('train.sh', [*LOC, '--accelerator-type', 'v4-32', '--workdir', '/tmp/run'],
     '--workdir must be gs://BUCKET/RUN on v4-32 (4 hosts)'),
    ('train.sh', [*LOC, '--accelerator-type', 'v4-32', '--workdir', 'runs/1'],
     '--workdir must be gs://BUCKET/RUN on v4-32'),
    ('train.sh', [*LOC, '--workdir', '/tmp/run'], 'needs --accelerator-type'),
    ('train.sh', [*LOC, '--accelerator-type', 'v4-6', '--workdir', 'gs://b/r'],
     "unknown accelerator type 'v4-6'"),
    ('logs.sh', ['--zone', ZONE], 'missing --name'),
    ('logs.sh', [*LOC, '--worker', 'first'], "bad --worker 'first'"),
    ('stop.sh', ['--zone', ZONE], 'missing --name'),
    ('stop.sh', [*LOC, 'now'], "unexpected argument 'now'"),
    ('delete.sh', ['--zone', ZONE], 'missing --name'),
]


@pytest.mark.parametrize('script, args, message', BAD)
def test_bad_arguments(launch, script, args, message):
  proc = launch(script, *args, '--dry-run', ok=False)
  assert proc.returncode != 0
  assert proc.stdout == ''
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith(f'{script}: error: ')
  assert message in proc.stderr
  assert launch.calls() == []


def test_delete_without_a_terminal_needs_yes(launch):
  proc = launch('delete.sh', *LOC, ok=False)
  assert proc.returncode != 0
  assert len(proc.stderr.splitlines()) == 1 and '--yes' in proc.stderr
  assert launch.calls() == []


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help(launch, script, flag):
  proc = launch(script, flag)
  assert proc.stdout.startswith(f'Usage: {script} --name NAME --zone ZONE')
  assert '--dry-run' in proc.stdout
  assert launch.calls() == []


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_executable(script):
  assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize('script', [*SCRIPTS, 'common.sh'])
def test_shellcheck(script):
  if not SHELLCHECK.exists():
    pytest.skip(f'no shellcheck at {SHELLCHECK}')
  proc = subprocess.run([str(SHELLCHECK), '--external-sources', script], cwd=LAUNCH,
                        capture_output=True, text=True, timeout=20)
  assert (proc.returncode, proc.stdout + proc.stderr) == (0, '')
