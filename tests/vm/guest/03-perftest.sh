#!/usr/bin/env bash
# perftest over rdma_cm (-R), server and client in the guest: ib_write_bw (64 KiB) and
# ib_read_lat (2 B) exit 0 and print their result line. The figures are emulated (TCG) and
# only comparable with other figures of the same boot.
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm
dev=$MF_VM_RDMA_DEV

# run_pair NAME PORT RESULT_REGEX ARGS...: server and client of one perftest tool.
run_pair() {
  local tool=$1 port=$2 regex=$3 out
  shift 3
  note "$tool $* (port $port)"
  spawn "$tool" -R -d "$dev" -F -p "$port" "$@" >"/tmp/$tool-server.log" 2>&1
  local server=$!
  wait_cm_listen "$port"
  if ! cm_client "/tmp/$tool-client.log" "$tool" -R -d "$dev" -F -p "$port" "$@" "$MF_VM_ADDR"; then
    cat "/tmp/$tool-client.log"
    echo "--- $tool server:"
    cat "/tmp/$tool-server.log"
    fail "$tool client failed"
  fi
  out=$(<"/tmp/$tool-client.log")
  wait "$server" || { cat "/tmp/$tool-server.log"; fail "$tool server failed"; }
  grep -E '^[[:space:]]*#bytes' <<<"$out"
  grep -E "$regex" <<<"$out" || { echo "$out"; fail "$tool printed no result line"; }
}

num='[[:space:]]+[0-9]+(\.[0-9]+)?'
run_pair ib_write_bw 18515 "^[[:space:]]*65536[[:space:]]+500$num$num$num" -s 65536 -n 500
run_pair ib_read_lat 18516 "^[[:space:]]*2[[:space:]]+1000$num$num$num$num" -s 2 -n 1000
echo "PASS: ib_write_bw -R and ib_read_lat -R"
