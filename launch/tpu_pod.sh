#!/usr/bin/env bash
# Runs a training command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- \
#       xformers-jax train --config configs/xlm_roberta/pretrain_mlm.py:xl \
#           --workdir gs://BUCKET/xlmr_xl --config.mesh.fsdp=16 --config.mesh.tensor=4
#
# Each worker gets the committed repo (git archive of HEAD), installs it with jax[tpu], and runs the same
# command; XFJ_DISTRIBUTED=auto makes `jax.distributed.initialize()` discover the pod. The workdir
# must be shared by all workers (a gs:// bucket). Preemption sends SIGTERM: the trainer saves and
# exits 0, and re-running this script resumes.
set -euo pipefail
[[ $# -ge 3 ]] || { echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2; exit 2; }
TPU="$1"; ZONE="$2"; shift 2
PROJECT_ARGS=()
if [[ "$1" != "--" ]]; then PROJECT_ARGS=(--project "$1"); shift; fi
[[ "${1:-}" == "--" ]] || { echo "missing -- before the command" >&2; exit 2; }
shift
CMD=$(printf '%q ' "$@")
REPO=$(cd "$(dirname "$0")/.." && pwd)

TARBALL=$(mktemp --suffix=.tar.gz)
git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD   # the committed tree, no .venv
gcloud compute tpus tpu-vm scp --worker=all --zone "$ZONE" "${PROJECT_ARGS[@]}" \
  "$TARBALL" "$TPU":~/xformers_jax_src.tar.gz
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone "$ZONE" "${PROJECT_ARGS[@]}" --command "
  set -e
  mkdir -p ~/xformers_jax_src && tar -xzf ~/xformers_jax_src.tar.gz -C ~/xformers_jax_src
  cd ~/xformers_jax_src
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip 'jax[tpu]' && pip install -q -e .
  XFJ_DISTRIBUTED=auto $CMD
"
