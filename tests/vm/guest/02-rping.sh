#!/usr/bin/env bash
# rping between two processes over rdma_cm: the server and the client both exit 0 and the
# client validated every ping (-V).
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm
readonly PORT=7471 COUNT=20

note "rping server on $MF_VM_ADDR:$PORT"
spawn rping -s -a "$MF_VM_ADDR" -p "$PORT" -C "$COUNT" -V >/tmp/rping-server.log 2>&1
server=$!
wait_cm_listen "$PORT"

note "rping client, $COUNT pings"
cm_client /tmp/rping-client.log rping -c -a "$MF_VM_ADDR" -p "$PORT" -C "$COUNT" -v -V ||
  { cat /tmp/rping-client.log; fail "rping client failed"; }
cat /tmp/rping-client.log
wait "$server" || { cat /tmp/rping-server.log; fail "rping server failed"; }
pings=$(grep -c '^ping data: rdma-ping-' /tmp/rping-client.log || true)
((pings == COUNT)) || fail "client reported $pings pings, not $COUNT"
echo "PASS: rping $COUNT pings over rdma_cm"
