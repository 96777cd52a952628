# shellcheck shell=bash
# Helpers for the guest tests in this folder: source it, then call the functions.
# The tests run inside the test VM (tests/vm/run-in-vm), never on the host.

set -euo pipefail

# The guest is emulated (TCG) and shares the host's cores with another VM and the host's
# tests: a connect and handshake that takes milliseconds natively once overran the client's
# default 5 s in CI (server hello received, the reply to AUTH late). Every memfabric client
# started by these tests gets 30 s.
export MEMFABRIC_CONNECT_TIMEOUT=${MEMFABRIC_CONNECT_TIMEOUT:-30s}

# need_vm: stop with a clear message when not inside the test VM.
need_vm() {
  if [[ -z ${MF_VM:-} ]]; then
    echo "$(basename "$0"): runs inside the test VM only: tests/vm/run-in-vm -- $0" >&2
    exit 2
  fi
}

# fail MESSAGE...: print and exit 1.
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# note MESSAGE...: a progress line.
note() {
  echo "--- $*"
}

# wait_cm_listen PORT [SECONDS]: wait until an rdma_cm id listens on PORT (default 30 s).
# The listener shows in `rdma resource` a moment before the CM accepts connections for it
# (a client that comes in between is rejected with error 8): hence the short pause, and
# cm_client's retry.
wait_cm_listen() {
  local port=$1 deadline=$((SECONDS + ${2:-30}))
  until [[ $(rdma resource show cm_id 2>/dev/null) =~ state\ LISTEN\ [^$'\n']*:$port\  ]]; do
    ((SECONDS < deadline)) || fail "nothing listens on rdma_cm port $port after ${2:-30}s"
    sleep 0.1
  done
  sleep 0.3
}

# cm_client OUT CMD...: run an rdma_cm client CMD (time limit 120 s) with its output in the
# file OUT; try again, up to 3 times, while the connection is rejected. Returns CMD's status.
cm_client() {
  local out=$1 try rc
  shift
  for try in 1 2 3; do
    rc=0
    timeout 120 "$@" >"$out" 2>&1 || rc=$?
    if ((rc == 0)) || ! grep -q RDMA_CM_EVENT_REJECTED "$out"; then
      break
    fi
    echo "(connection rejected, attempt $try; retrying)"
    sleep 1
  done
  return "$rc"
}

# wait_path TEST PATH [SECONDS]: wait until [[ TEST PATH ]] holds, e.g. wait_path -S sock.
wait_path() {
  local test=$1 path=$2 deadline=$((SECONDS + ${3:-30}))
  until test "$test" "$path"; do
    ((SECONDS < deadline)) || fail "$path did not appear after ${3:-30}s"
    sleep 0.1
  done
}

# wait_blocking PID SIGNUM [SECONDS]: wait until process PID blocks signal SIGNUM (default
# 30 s), i.e. it reached the code that takes the signal with sigwait. A signal sent before
# then meets the default action, and a background job of a non-interactive shell ignores
# SIGINT: sent that early, the signal is lost and the process never hears of it.
wait_blocking() {
  local pid=$1 sig=$2 deadline=$((SECONDS + ${3:-30})) mask
  while :; do
    mask=$(awk '/^SigBlk:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || mask=
    [[ -n $mask ]] || fail "process $pid exited before it blocked signal $sig"
    (((16#$mask >> (sig - 1)) & 1)) && return 0
    ((SECONDS < deadline)) || fail "process $pid did not block signal $sig in ${3:-30}s"
    sleep 0.05
  done
}

# Background processes started with `spawn` are killed when the test exits.
_spawned=()
spawn() {
  "$@" &
  _spawned+=($!)
}
_kill_spawned() {
  local pid
  for pid in "${_spawned[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap _kill_spawned EXIT
