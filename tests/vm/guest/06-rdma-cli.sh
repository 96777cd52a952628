#!/usr/bin/env bash
# The memfabric CLI over RDMA (rxe0) in the guest: `serve --rdma on`, then ls / write /
# read / stat / bench through rdma://, auto:// picking RDMA, data written over RDMA read
# back over TCP, a clear error for rdma:// against a TCP-only server, and no memory
# registration or queue pair left on the server once its clients are gone.
#   06-rdma-cli.sh MEMFABRIC
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm
MF=${1:?usage: 06-rdma-cli.sh MEMFABRIC}
ADDR=$MF_VM_ADDR
W=$(mktemp -d)
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$W/secret")
S=(--secret-file "$W/secret")

# resources COMM KIND: how many rdma resources of KIND (mr, qp, pd, cq) processes named
# COMM hold.
resources() { rdma resource show "$2" 2>/dev/null | grep -c "comm $1" || true; }

note "serve --rdma on"
spawn "$MF" serve --listen "$ADDR:7411" --region a=64M "${S[@]}" --rdma on >"$W/serve.log" 2>&1
SERVE=$!
wait_cm_listen 7411
grep -q "rdma" "$W/serve.log" || { cat "$W/serve.log"; fail "serve does not mention its RDMA data plane"; }

"$MF" ls "rdma://$ADDR:7411" "${S[@]}" | tee "$W/ls" | grep -q '^a ' || { cat "$W/ls"; fail "ls over rdma://"; }
head -c $((3 << 20)) /dev/urandom >"$W/in"
"$MF" write "rdma://$ADDR:7411/a" 12345 "${S[@]}" <"$W/in" || fail "write over rdma://"
"$MF" read "rdma://$ADDR:7411/a" 12345 $((3 << 20)) "${S[@]}" >"$W/out-rdma" || fail "read over rdma://"
cmp "$W/in" "$W/out-rdma" || fail "rdma read-back differs"
"$MF" read "tcp://$ADDR:7411/a" 12345 $((3 << 20)) "${S[@]}" >"$W/out-tcp" || fail "read over tcp://"
cmp "$W/in" "$W/out-tcp" || fail "tcp read-back of RDMA-written data differs"
"$MF" stat "rdma://$ADDR:7411/a" "${S[@]}" | tee "$W/stat" | grep -q "transport: *rdma" ||
  { cat "$W/stat"; fail "stat does not show transport rdma"; }

for scheme in rdma auto; do
  "$MF" bench "$scheme://$ADDR:7411/a" "${S[@]}" -q --json --seconds 0.5 --pattern randread,read >"$W/bench.json" ||
    fail "bench over $scheme://"
  t=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["transport"])' "$W/bench.json")
  [[ $t == rdma ]] || fail "bench over $scheme:// ran over $t"
  echo "bench $scheme:// ran over $t"
done

# The server gives back every registration and queue pair when its clients leave.
deadline=$((SECONDS + 10))
until (($(resources memfabric mr) == 0 && $(resources memfabric qp) == 0)); do
  ((SECONDS < deadline)) || { rdma resource show mr; rdma resource show qp; fail "server kept RDMA resources"; }
  sleep 0.2
done
echo "server holds no MR and no QP after its clients left"

kill -TERM "$SERVE"
wait "$SERVE" || fail "serve did not exit 0 on SIGTERM"

note "a TCP-only server and rdma://"
spawn "$MF" serve --listen "$ADDR:7412" --region a=4M "${S[@]}" --rdma off >"$W/serve2.log" 2>&1
for _ in $(seq 50); do "$MF" ls "tcp://$ADDR:7412" "${S[@]}" >/dev/null 2>&1 && break; sleep 0.1; done
rc=0
"$MF" read "rdma://$ADDR:7412/a" 0 10 "${S[@]}" >/dev/null 2>"$W/err" || rc=$?
[[ $rc == 1 ]] || fail "rdma:// against a TCP-only server exited $rc"
grep -q "no RDMA data plane" "$W/err" || { cat "$W/err"; fail "unclear error"; }
"$MF" read "auto://$ADDR:7412/a" 0 10 "${S[@]}" >/dev/null || fail "auto:// did not fall back to TCP"
echo "PASS: memfabric CLI over RDMA"
