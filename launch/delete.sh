#!/usr/bin/env bash
# Deletes a slice (or, with --queued, its queued resource and the slice in it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE [--queued] [--yes] [options]

Deletes the TPU slice: its disks and everything on them (the workdir in gs://
stays). Asks first, unless --yes; gcloud itself runs with --quiet.

  --name NAME        the slice
  --zone ZONE        its zone
  --project PROJECT  Google Cloud project (default: gcloud's)
  --queued           it was made with create.sh --queued: delete the queued
                     resource (--force: with its slice)
  --yes, -y          do not ask
  --dry-run          print the command, run nothing (and ask nothing)
  -h, --help         this help
EOF
}

QUEUED=0
YES=0
while (($#)); do
  case $1 in
    --queued) QUEUED=1; shift ;;
    --yes | -y) YES=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone

if ((QUEUED)); then
  CMD=(gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet)
  WHAT="queued resource $NAME and its slice"
else
  CMD=(gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet)
  WHAT="TPU slice $NAME"
fi

if ((DRY_RUN == 0 && YES == 0)); then
  [[ -t 0 ]] || die "stdin is not a terminal, so no one can confirm: pass --yes to delete $WHAT"
  read -r -p "Delete $WHAT in $ZONE? [y/N] " answer
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || { note "not deleted"; exit 1; }
fi
run "${CMD[@]}"
