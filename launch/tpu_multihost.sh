#!/usr/bin/env bash
# One run on a multi-host Cloud TPU slice: the same command on every worker at once.
#
# usage: TPU=NAME ZONE=ZONE [PROJECT=ID] launch/tpu_multihost.sh CONFIG WORKDIR [FLAGS...]
#   e.g. TPU=v4-32-a ZONE=us-central2-b launch/tpu_multihost.sh configs/imagenet.py \
#          /mnt/shared/runs/in1k --config.data.data_dir=/mnt/shared/tfds
# env: REPO_DIR (the checkout on every worker, default ~/jaxrepro), PYTHON (python3),
#      DRY_RUN=1 (print the gcloud command, run nothing).
#
# Every worker runs `jaxrepro train` with JAXREPRO_DISTRIBUTED=auto, so jaxrepro calls
# jax.distributed.initialize(), which finds the other workers from the TPU metadata. WORKDIR
# must be a file system every worker sees (Filestore/NFS or a gcsfuse mount): worker 0
# writes the workdir's files, every worker writes its part of each checkpoint.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: TPU=NAME ZONE=ZONE $0 CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
: "${TPU:?set TPU=the TPU VM name}"
: "${ZONE:?set ZONE=its zone}"
CONFIG=$1
WORKDIR=$2
shift 2
REPO_DIR=${REPO_DIR:-'~/jaxrepro'}
PYTHON=${PYTHON:-python3}

remote="cd $REPO_DIR && JAXREPRO_DISTRIBUTED=auto $PYTHON -m jaxrepro train"
for arg in --config="$CONFIG" --workdir="$WORKDIR" "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$remote")
if [ -n "${PROJECT:-}" ]; then
  cmd+=(--project="$PROJECT")
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
