#!/usr/bin/env bash
# Readies every worker of a slice: code, uv, the locked environment, the data.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE [--data gs://...] [--gemma gs://...] [--repo URL [--ref REF]] [options]

On every worker of the slice (--worker=all): puts the code in $REMOTE_DIR,
installs uv, runs 'uv sync --locked --extra tpu', and copies the prepared
ArrayRecord files (--data) and the Gemma checkpoint (--gemma) to the worker's
disk. Safe to run again (e.g. after a code change).

  --name NAME        the slice
  --zone ZONE        its zone
  --project PROJECT  Google Cloud project (default: gcloud's)
  --data gs://...    folder of prepared data; its contents go to $REMOTE_DATA_DIR
                     (then train with: -- --config.data.dir=$REMOTE_DATA_DIR)
  --gemma gs://...   folder holding a Kaggle Gemma Flax checkpoint (2b/ and
                     tokenizer.model); it goes to ~/ under its own name, e.g.
                     gs://BUCKET/gemma-2b to ~/gemma-2b, where configs/v4_8.py looks
  --repo URL         git clone URL on each worker instead of copying this
                     checkout (default: a tarball of this checkout's HEAD,
                     made with 'git archive'; uncommitted changes stay behind)
  --ref REF          branch, tag or commit to fetch with --repo (default: HEAD)
  --ssh-flag=FLAG    pass FLAG to every gcloud ssh/scp (repeatable), e.g.
                     --ssh-flag=--tunnel-through-iap or --ssh-flag=--internal-ip
  --dry-run          print the commands, run nothing
  -h, --help         this help
EOF
}

DATA=''
GEMMA=''
REPO=''
REF=''
while (($#)); do
  case $1 in
    --data | --data=*) take_value "$@"; DATA=$VALUE; shift "$SHIFT_BY" ;;
    --gemma | --gemma=*) take_value "$@"; GEMMA=$VALUE; shift "$SHIFT_BY" ;;
    --repo | --repo=*) take_value "$@"; REPO=$VALUE; shift "$SHIFT_BY" ;;
    --ref | --ref=*) take_value "$@"; REF=$VALUE; shift "$SHIFT_BY" ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone
# check_gs_folder FLAG VALUE EXAMPLE: VALUE is a gs:// folder in plain characters.
check_gs_folder() {
  [[ $2 =~ ^gs://[a-z0-9][-_.a-z0-9]*(/[-_.A-Za-z0-9]+)*/?$ ]] ||
    die "$1 must be a gs:// folder such as $3 (letters, digits, '-', '_', '.'), not '$2'"
}
if [[ -n $DATA ]]; then
  check_gs_folder --data "$DATA" gs://my-bucket/mtnt
  DATA=${DATA%/}
fi
if [[ -n $GEMMA ]]; then
  check_gs_folder --gemma "$GEMMA" gs://my-bucket/gemma-2b
  GEMMA=${GEMMA%/}
  [[ $GEMMA == gs://*/* ]] || die "--gemma must name a folder inside the bucket, e.g. gs://my-bucket/gemma-2b"
fi
[[ -z $REF || -n $REPO ]] || die "--ref needs --repo URL (without --repo, this checkout's HEAD is copied)"

# 1. The code.
if [[ -n $REPO ]]; then
  note "fetching ${REF:-HEAD} of $REPO on every worker"
  tpu_ssh all "mkdir -p $REMOTE_DIR && cd $REMOTE_DIR && { [ -d .git ] || git init -q; } && git fetch -q --depth=1 $(quote "$REPO") $(quote "${REF:-HEAD}") && git checkout -q --force --detach FETCH_HEAD"
else
  git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null ||
    die "$REPO_ROOT has no git commit to copy: commit first, or pass --repo URL"
  if ! GIT_OPTIONAL_LOCKS=0 git -C "$REPO_ROOT" diff --quiet HEAD -- ||
    [[ -n $(git -C "$REPO_ROOT" ls-files --others --exclude-standard) ]]; then
    note "warning: uncommitted changes and untracked files are not copied (only HEAD is)"
  fi
  TARBALL=${TMPDIR:-/tmp}
  TARBALL=${TARBALL%/}/mtnt_tpu-$NAME.tar.gz
  note "copying HEAD ($(git -C "$REPO_ROOT" rev-parse --short HEAD)) to every worker"
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:mtnt_tpu.tar.gz" "${LOC[@]}" --worker=all \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
  tpu_ssh all "mkdir -p $REMOTE_DIR && tar -xzf mtnt_tpu.tar.gz -C $REMOTE_DIR && rm mtnt_tpu.tar.gz"
  run rm -f "$TARBALL"
fi

# 2. uv and the locked environment (uv fetches a Python >= 3.11 if the image lacks one).
tpu_ssh all "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv && cd $REMOTE_DIR && ~/.local/bin/uv sync --locked --extra tpu"

# 3. The data and the weights, on each worker's local disk (ArrayRecord is read from there).
if [[ -n $DATA ]]; then
  tpu_ssh all "mkdir -p $REMOTE_DATA_DIR && gcloud storage cp -r \"$DATA/*\" $REMOTE_DATA_DIR/"
fi
if [[ -n $GEMMA ]]; then
  tpu_ssh all "mkdir -p ~/${GEMMA##*/} && gcloud storage cp -r \"$GEMMA/*\" ~/${GEMMA##*/}/"
fi
note "done; now: launch/train.sh --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT} --workdir gs://BUCKET/RUN${DATA:+ -- --config.data.dir=$REMOTE_DATA_DIR}"
