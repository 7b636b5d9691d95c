#!/usr/bin/env bash
# Runs a command as N local processes x D CPU devices each, joined by jax.distributed over
# 127.0.0.1 -- a multi-host run on one machine, for testing what a pod run does.
#
#   launch/local_multihost.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- \
#       xformers-jax train --config configs/xlm_roberta/pretrain_mlm.py:tiny --workdir w
#
# Every process runs the same command; process i logs to <workdir-or-.>/host_<i>.log as well as
# stdout (prefixed). Exits non-zero if any process fails.
set -euo pipefail
NUM=2; DEV=4; PORT=$((20000 + RANDOM % 20000))
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NUM="$2"; shift 2 ;;
    -d) DEV="$2"; shift 2 ;;
    -p) PORT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [-n N] [-d D] [-p PORT] -- COMMAND..." >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [-n N] [-d D] [-p PORT] -- COMMAND..." >&2; exit 2; }

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM
for ((i = 0; i < NUM; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEV}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="${NUM}" JAX_PROCESS_ID="${i}" \
    "$@" > >(sed "s/^/[host $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
