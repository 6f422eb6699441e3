#!/usr/bin/env bash
# Starts training on every worker of a slice, detached, logging to train.log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE --workdir gs://BUCKET/RUN [options] [-- TRAINER_FLAGS...]

Starts 'python -m mtnt_tpu.main' on every worker (--worker=all), detached from
the ssh session, with its output in $REMOTE_DIR/train.log on each worker (the
previous one is kept as train.log.prev). Refuses to start where it already runs.

  --name NAME              the slice
  --zone ZONE              its zone
  --project PROJECT        Google Cloud project (default: gcloud's)
  --workdir DIR            checkpoints and TensorBoard; must be gs://... on a
                           multi-host slice (a local DIR only on one host)
  --config PATH            config file in the checkout (default: configs/v4_8.py)
  --accelerator-type TYPE  the slice's type, to check --workdir without asking
                           gcloud (needed for a local --workdir under --dry-run)
  --ssh-flag=FLAG          pass FLAG to every gcloud ssh/scp (repeatable), e.g.
                           --ssh-flag=--tunnel-through-iap or --ssh-flag=--internal-ip
  --dry-run                print the commands, run nothing
  -h, --help               this help

Flags after '--' are appended to the trainer's command, e.g.
  -- --config.data.dir=~/data --config.train.num_steps=100
(a leading '~/' in them means the worker's home).
EOF
}

WORKDIR=''
CONFIG=configs/v4_8.py
ACCELERATOR_TYPE=''
EXTRA=()
while (($#)); do
  case $1 in
    --workdir | --workdir=*) take_value "$@"; WORKDIR=$VALUE; shift "$SHIFT_BY" ;;
    --config | --config=*) take_value "$@"; CONFIG=$VALUE; shift "$SHIFT_BY" ;;
    --accelerator-type | --accelerator-type=*)
      take_value "$@"; ACCELERATOR_TYPE=$VALUE; shift "$SHIFT_BY" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone
[[ -n $WORKDIR ]] || die "missing --workdir: pass --workdir gs://BUCKET/RUN (checkpoints and TensorBoard go there)"
[[ -n $CONFIG ]] || die "--config needs a path, e.g. --config configs/v4_8.py"
# The workers run the checkout setup.sh copied from here: the file must be in it.
[[ -f $REPO_ROOT/$CONFIG ]] ||
  die "--config $CONFIG is not a file of this checkout (the workers run a copy of it): e.g. --config configs/v4_8.py"
[[ -z $ACCELERATOR_TYPE ]] || check_accelerator "$ACCELERATOR_TYPE"

if [[ $WORKDIR == gs://* ]]; then
  [[ $WORKDIR =~ ^gs://[^/]+ ]] || die "--workdir '$WORKDIR' names no bucket: use gs://BUCKET/RUN"
else
  # A local workdir is only sound on one host: each host would write its own.
  if [[ -z $ACCELERATOR_TYPE ]]; then
    ((DRY_RUN == 0)) ||
      die "a local --workdir needs --accelerator-type under --dry-run (to know the slice has one host), or use --workdir gs://BUCKET/RUN"
    note "asking gcloud for the accelerator type of $NAME (a local --workdir needs one host)"
    ACCELERATOR_TYPE=$(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(acceleratorType)')
    ACCELERATOR_TYPE=${ACCELERATOR_TYPE##*/}
    check_accelerator "$ACCELERATOR_TYPE"
  fi
  ((HOSTS == 1)) ||
    die "--workdir must be gs://BUCKET/RUN on $ACCELERATOR_TYPE ($(hosts_phrase)), not '$WORKDIR': each host would write its own local checkpoints"
fi

TRAIN=(.venv/bin/python -m mtnt_tpu.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
TRAIN_TEXT=''
for word in "${TRAIN[@]}"; do
  TRAIN_TEXT+="${TRAIN_TEXT:+ }$(quote_remote "$word")"
done

[[ -z $ACCELERATOR_TYPE ]] || note "starting on $(hosts_phrase) of $ACCELERATOR_TYPE"
# Every worker is asked first and none starts unless all are free: a worker
# started beside one that refused would wait out jax.distributed's 300 s
# rendezvous for it and then die.
tpu_ssh all "if pgrep -f \"$PROC_PATTERN\" >/dev/null; then echo \"\$(hostname): already training; run launch/stop.sh first\" >&2; exit 1; fi"
tpu_ssh all "cd $REMOTE_DIR || exit 1; [ ! -f train.log ] || mv -f train.log train.log.prev; setsid nohup $TRAIN_TEXT >train.log 2>&1 </dev/null & pid=\$!; sleep \${MTNT_START_CHECK_S:-20}; if kill -0 \$pid 2>/dev/null; then echo \"\$(hostname): started pid \$pid, log in $REMOTE_DIR/train.log\"; else echo \"\$(hostname): the trainer exited in its first seconds; the end of $REMOTE_DIR/train.log:\" >&2; tail -n 5 train.log >&2; exit 1; fi"
note "follow it with: launch/logs.sh --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT}"
