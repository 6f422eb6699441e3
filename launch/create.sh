#!/usr/bin/env bash
# Creates a Cloud TPU VM slice: on-demand, spot, or as a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS...]

Creates a TPU VM slice and says how many workers (hosts) it has.

  --name NAME               name of the slice (and of the queued resource)
  --zone ZONE               e.g. us-central2-b (v4)
  --project PROJECT         Google Cloud project (default: gcloud's)
  --accelerator-type TYPE   v4-N (N a power of two >= 8: v4-8 is 1 host,
                            v4-32 is 4), v5litepod-N, v5p-N or v6e-N
  --runtime-version V       TPU VM image (default: tpu-ubuntu2204-base for v4,
                            v2-alpha-tpuv5 / v2-alpha-tpuv5-lite / v2-alpha-tpuv6e)
  --spot                    spot capacity: cheaper, can be preempted
  --queued                  create a queued resource that waits for capacity
                            (with --spot too if you like)
  --dry-run                 print the gcloud commands, run nothing
  -h, --help                this help

Flags after '--' go to gcloud as they are (e.g. -- --network=my-net).
EOF
}

ACCELERATOR_TYPE=''
RUNTIME_VERSION=''
SPOT=0
QUEUED=0
EXTRA=()
while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*)
      take_value "$@"; ACCELERATOR_TYPE=$VALUE; shift "$SHIFT_BY" ;;
    --runtime-version | --runtime-version=*)
      take_value "$@"; RUNTIME_VERSION=$VALUE; shift "$SHIFT_BY" ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_name_and_zone
[[ -n $ACCELERATOR_TYPE ]] ||
  die "missing --accelerator-type: pass e.g. --accelerator-type v4-8"
check_accelerator "$ACCELERATOR_TYPE"
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}

if ((QUEUED)); then
  CMD=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
else
  CMD=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
fi
((SPOT == 0)) || CMD+=(--spot)
if ((HOSTS == 1)); then
  note "$ACCELERATOR_TYPE has 1 host (worker 0)"
else
  note "$ACCELERATOR_TYPE has $HOSTS hosts (workers 0-$((HOSTS - 1)); setup.sh and train.sh act on all of them)"
fi
run "${CMD[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
if ((QUEUED)); then
  note "the slice exists once the queued resource is ACTIVE; watch it with:"
  note "  $(quote_cmd gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)')"
fi
