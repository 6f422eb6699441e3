#!/usr/bin/env bash
# Shows the training log of one worker (default 0) or of all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow] [options]

Tails $REMOTE_DIR/train.log on a worker and follows it (Ctrl-C to stop; training
goes on). With --worker all, each line starts with the worker's hostname.

  --name NAME        the slice
  --zone ZONE        its zone
  --project PROJECT  Google Cloud project (default: gcloud's)
  --worker N|all     which worker (default: 0, the one that logs metrics)
  --lines N          lines of history to show first (default: 100)
  --no-follow        print them and return
  --ssh-flag=FLAG    pass FLAG to every gcloud ssh/scp (repeatable), e.g.
                     --ssh-flag=--tunnel-through-iap or --ssh-flag=--internal-ip
  --dry-run          print the command, run nothing
  -h, --help         this help
EOF
}

WORKER=0
LINES=100
FOLLOW=1
while (($#)); do
  case $1 in
    --worker | --worker=*) take_value "$@"; WORKER=$VALUE; shift "$SHIFT_BY" ;;
    --lines | --lines=*) take_value "$@"; LINES=$VALUE; shift "$SHIFT_BY" ;;
    --no-follow) FOLLOW=0; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "bad --worker '$WORKER': use a worker number (0, 1, ...) or all"
[[ $LINES =~ ^[0-9]+$ ]] || die "bad --lines '$LINES': use a number of lines, e.g. --lines 100"

TAIL="tail -n $LINES"
((FOLLOW == 0)) || TAIL+=' -F'
TAIL+=" $REMOTE_DIR/train.log"
if [[ $WORKER == all ]]; then
  TAIL+=" 2>&1 | sed -u \"s/^/\$(hostname): /\""
fi
tpu_ssh "$WORKER" "$TAIL"
