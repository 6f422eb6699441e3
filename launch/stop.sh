#!/usr/bin/env bash
# Stops training on every worker: SIGTERM, so the trainer checkpoints and exits.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE [--wait] [options]

Sends SIGTERM to the trainer (python -m mtnt_tpu.main) on every worker
(--worker=all); it saves a checkpoint to its workdir and exits. The slice keeps
running (and billing): launch/delete.sh removes it.

  --name NAME        the slice
  --zone ZONE        its zone
  --project PROJECT  Google Cloud project (default: gcloud's)
  --wait             return only once the trainer has exited on every worker
  --ssh-flag=FLAG    pass FLAG to every gcloud ssh/scp (repeatable), e.g.
                     --ssh-flag=--tunnel-through-iap or --ssh-flag=--internal-ip
  --dry-run          print the command, run nothing
  -h, --help         this help
EOF
}

WAIT=0
while (($#)); do
  case $1 in
    --wait) WAIT=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone

# -o: only the oldest match, the trainer itself, not processes it forked.
STOP="if pkill -TERM -o -f \"$PROC_PATTERN\"; then echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): not training\"; fi"
if ((WAIT)); then
  STOP+="; while pgrep -f \"$PROC_PATTERN\" >/dev/null; do sleep 5; done; echo \"\$(hostname): stopped\""
fi
tpu_ssh all "$STOP"
