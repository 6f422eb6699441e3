# shellcheck shell=bash
# The scripts that source this file use its variables (SC2034 cannot see that).
# shellcheck disable=SC2034
# Shared helpers for the launch/*.sh scripts; sourced, never run.
#
# A script using it defines usage() (prints its help to stdout), then parses
# its own flags and hands every other one to parse_common_flag, e.g.
#
#   while (($#)); do
#     case $1 in
#       --spot) SPOT=1; shift ;;
#       *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
#     esac
#   done
#   require_name_and_zone

# Where the repository checkout lives on each worker (train.log goes there too).
# Kept as text: '~' is expanded by the worker's shell, not here.
# shellcheck disable=SC2088
REMOTE_DIR='~/mtnt_tpu'
# shellcheck disable=SC2088
REMOTE_DATA_DIR='~/data'
# pgrep/pkill -f pattern for the trainer: a command line that starts with a
# python and runs `-m mtnt_tpu.main`. Anchored, so that it never matches the
# `bash -c ...` that runs the ssh command holding this very text.
PROC_PATTERN='^[^ ]*python[^ ]* .*-m mtnt_tpu[.]main'

LAUNCH_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname -- "$LAUNCH_DIR")
SCRIPT=$(basename -- "$0")

NAME=''
ZONE=''
PROJECT=''
DRY_RUN=0
SHIFT_BY=1

# die MESSAGE: one line on stderr, exit 2.
die() {
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

# note MESSAGE: progress for the user, on stderr so that a dry run's stdout
# holds nothing but commands.
note() {
  printf '%s: %s\n' "$SCRIPT" "$*" >&2
}

# quote WORD: WORD as the shell would read it back; bare when it is safe.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    local q="'\\''"
    printf "'%s'" "${s//\'/$q}"
  fi
}

# quote_arg WORD: like quote, but writes --flag=VALUE as --flag=QUOTED_VALUE.
quote_arg() {
  local s=$1
  if [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    local value=${BASH_REMATCH[2]}
    printf '%s' "${BASH_REMATCH[1]}"
    quote "$value"
  else
    quote "$s"
  fi
}

# quote_cmd WORD...: the words as one line that could be pasted into a shell.
quote_cmd() {
  local out='' w
  for w in "$@"; do
    out+="${out:+ }$(quote_arg "$w")"
  done
  printf '%s' "$out"
}

# quote_remote WORD: like quote_arg, for a word a worker's shell will read;
# a leading '~/' (or one right after the first '=') becomes "$HOME"/ there, so
# `--config.data.dir=~/data` names the worker's home as the user meant.
quote_remote() {
  local s=$1 re='^([^=]*=)?~/(.*)$'
  if [[ $s =~ $re ]]; then
    local head=${BASH_REMATCH[1]} tail=${BASH_REMATCH[2]}
    [[ -z $head ]] || quote "$head"
    # shellcheck disable=SC2016  # "$HOME" is for the worker's shell
    printf '"$HOME"/'
    [[ -z $tail ]] || quote "$tail"
  else
    quote_arg "$s"
  fi
}

# run CMD...: print CMD (shell-quoted, one line) under --dry-run, else run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# take_value "$@": the value of the flag in $1, as --flag=VALUE or --flag VALUE;
# sets VALUE and SHIFT_BY.
take_value() {
  if [[ $1 == --*=* ]]; then
    VALUE=${1#*=}
    SHIFT_BY=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    VALUE=$2
    SHIFT_BY=2
  else
    die "${1} needs a value: ${1} VALUE (see --help)"
  fi
}

# Extra flags for every gcloud ssh and scp (--ssh-flag=--tunnel-through-iap,
# --ssh-flag=--internal-ip): a slice without external IPs is reached only so.
SSH_FLAGS=()

# parse_common_flag "$@": handles the flag in $1 if it is a common one
# (--name, --zone, --project, --ssh-flag, --dry-run, -h/--help) and sets
# SHIFT_BY; dies on anything else.
parse_common_flag() {
  case $1 in
    --ssh-flag=*) SSH_FLAGS+=("${1#*=}"); SHIFT_BY=1 ;;
    --ssh-flag) take_value "$@"; SSH_FLAGS+=("$VALUE") ;;
    --name | --name=*) take_value "$@"; NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@"; ZONE=$VALUE ;;
    --project | --project=*) take_value "$@"; PROJECT=$VALUE ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
}

# require_name_and_zone: checks --name and --zone; sets LOC, the location flags
# every gcloud tpus command takes.
require_name_and_zone() {
  [[ -n $NAME ]] || die "missing --name: pass --name TPU_NAME (the slice to act on)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad --name '$NAME': use lowercase letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "missing --zone: pass --zone ZONE (e.g. --zone us-central2-b for v4)"
  LOC=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")
}

# check_accelerator TYPE: validates TYPE; sets HOSTS (workers in the slice)
# and DEFAULT_RUNTIME (the TPU VM image for that generation).
check_accelerator() {
  local t=$1 n
  if [[ $t =~ ^v4-([1-9][0-9]{0,5})$ ]]; then
    # N counts TensorCores: 2 per chip, 4 chips per host.
    n=$((10#${BASH_REMATCH[1]}))
    ((n >= 8 && (n & (n - 1)) == 0)) ||
      die "unknown accelerator type '$t': v4-N needs N a power of two >= 8 (v4-8, v4-16, v4-32, ...)"
    HOSTS=$((n / 8))
    DEFAULT_RUNTIME=tpu-ubuntu2204-base
  elif [[ $t =~ ^v5p-([1-9][0-9]{0,5})$ ]]; then
    # N counts TensorCores: 2 per chip, 4 chips per host.
    n=$((10#${BASH_REMATCH[1]}))
    ((n >= 8 && n % 8 == 0)) ||
      die "unknown accelerator type '$t': v5p-N needs N a multiple of 8 (v5p-8, v5p-16, ...)"
    HOSTS=$((n / 8))
    DEFAULT_RUNTIME=v2-alpha-tpuv5
  elif [[ $t =~ ^(v5litepod|v6e)-([1-9][0-9]{0,5})$ ]]; then
    # N counts chips: up to 8 on one host, 4 per host beyond.
    n=$((10#${BASH_REMATCH[2]}))
    ((n >= 1 && n <= 256 && (n & (n - 1)) == 0)) ||
      die "unknown accelerator type '$t': ${BASH_REMATCH[1]}-N needs N a power of two from 1 to 256"
    if ((n <= 8)); then HOSTS=1; else HOSTS=$((n / 4)); fi
    if [[ ${BASH_REMATCH[1]} == v6e ]]; then
      DEFAULT_RUNTIME=v2-alpha-tpuv6e
    else
      DEFAULT_RUNTIME=v2-alpha-tpuv5-lite
    fi
  else
    die "unknown accelerator type '$t': use v4-N (e.g. v4-8, v4-32), v5litepod-N, v5p-N or v6e-N"
  fi
}

# hosts_phrase: "1 host" / "4 hosts".
hosts_phrase() {
  if ((HOSTS == 1)); then echo '1 host'; else echo "$HOSTS hosts"; fi
}

# tpu_ssh WORKER COMMAND: run COMMAND (text for the worker's shell) on WORKER
# (a number or 'all') of the slice.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2" \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
}
