#!/usr/bin/env bash
# End-to-end test of the memfabric CLI: serve a file-backed region on a free port, then
# drive it with the client subcommands and check outputs, exit codes and messages.
# Usage: cli_test.sh PATH/TO/memfabric
set -uo pipefail

MF=${1:?usage: cli_test.sh PATH/TO/memfabric}
[[ -x "$MF" ]] || { echo "cli_test: $MF is not executable" >&2; exit 1; }
unset MEMFABRIC_SECRET
SERVER_WAIT_TRIES=100  # x 0.1 s
REGION_SIZE_BYTES=4194304

WORK=$(mktemp -d /tmp/mf-cli-test.XXXXXX)
SERVE_PID=""
NBD_PID=""
FAILURES=0
CHECKS=0
cleanup() {
  [[ -n "$NBD_PID" ]] && kill "$NBD_PID" 2>/dev/null
  if [[ -n "$SERVE_PID" ]]; then
    kill "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

pass() { CHECKS=$((CHECKS + 1)); echo "ok   $*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); echo "FAIL $*"; }

# run NAME CMD...: runs CMD with stdout in $WORK/NAME.out, stderr in $WORK/NAME.err; sets RC.
run() {
  local name=$1
  shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  RC=$?
}
# expect_rc NAME WANT: the last `run NAME` exited with WANT.
expect_rc() {
  if [[ "$RC" == "$2" ]]; then pass "$1: exit $2"; else fail "$1: exit $RC, want $2; stderr: $(head -c 600 "$WORK/$1.err")"; fi
}
# expect_in NAME STREAM(out|err) REGEX: the output of `run NAME` matches REGEX.
expect_in() {
  if grep -Eq -- "$3" "$WORK/$1.$2"; then pass "$1: $2 matches /$3/"; else fail "$1: $2 lacks /$3/: $(head -c 600 "$WORK/$1.$2")"; fi
}
expect_not_in() {
  if grep -Eq -- "$3" "$WORK/$1.$2"; then fail "$1: $2 has /$3/"; else pass "$1: $2 lacks /$3/"; fi
}

SECRET="$WORK/secret"
(umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET")
WRONG_SECRET="$WORK/wrong-secret"
(umask 077 && echo "this-is-not-the-right-secret" >"$WRONG_SECRET")
BACKING="$WORK/region.data"

# start_server: serves region `data` backed by $BACKING on a free loopback port.
start_server() {
  rm -f "$WORK/port"
  "$MF" serve --listen 127.0.0.1:0 --port-file "$WORK/port" --secret-file "$SECRET" \
    --region "data=4M,backing=file:$BACKING" 2>>"$WORK/serve.log" &
  SERVE_PID=$!
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    [[ -s "$WORK/port" ]] && break
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [[ ! -s "$WORK/port" ]]; then
    fail "serve did not start: $(cat "$WORK/serve.log")"
    exit 1
  fi
  URL="tcp://127.0.0.1:$(cat "$WORK/port")"
  pass "serve listening on $URL"
}
# signal_and_wait PID SIGNAL NAME: sends SIGNAL, gives PID 10 s to exit (then SIGKILL and a
# failure for NAME); sets RC to its exit status.
signal_and_wait() {
  kill "-$2" "$1"
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$1" 2>/dev/null; then
    fail "$3: still running 10 s after SIG$2"
    kill -KILL "$1"
  fi
  RC=0
  wait "$1" || RC=$?
}
stop_server() {
  signal_and_wait "$SERVE_PID" TERM serve
  local rc=$RC
  SERVE_PID=""
  if ((rc == 0)); then pass "serve: exit 0 on SIGTERM"; else fail "serve: exit $rc on SIGTERM"; fi
}

# ---- usage: help, exit codes --------------------------------------------------------
for sub in serve ls create rm stat read write bench nbd swap; do
  run "help-$sub" "$MF" "$sub" --help
  expect_rc "help-$sub" 0
  expect_in "help-$sub" out "Example"
done
run help "$MF" --help
expect_rc help 0
expect_in help out "Example"
run no-subcommand "$MF"
expect_rc no-subcommand 2
run bad-flag "$MF" ls --no-such-flag tcp://127.0.0.1:1
expect_rc bad-flag 2
run insecure-public "$MF" serve --listen 0.0.0.0:0 --insecure
expect_rc insecure-public 2
expect_in insecure-public err "loopback"
run serve-no-secret "$MF" serve --listen 127.0.0.1:0
expect_rc serve-no-secret 2
expect_in serve-no-secret err "no secret: set MEMFABRIC_SECRET or pass --secret-file"
run bad-region "$MF" serve --listen 127.0.0.1:0 --insecure --region "x=lots"
expect_rc bad-region 2
expect_in bad-region err "NAME=SIZE"

# ---- serve and the client commands ---------------------------------------------------
start_server
C=(--secret-file "$SECRET")
cp "$WORK/serve.log" "$WORK/serve-start.err"
expect_in serve-start err "serving on $URL: transport tcp"
expect_in serve-start err "region data: 4 MiB, backing file $BACKING"

run ls "$MF" ls "$URL" "${C[@]}"
expect_rc ls 0
expect_in ls out "^NAME +SIZE"
expect_in ls out "^data +4 MiB +$REGION_SIZE_BYTES +file "

run stat "$MF" stat "$URL/data" "${C[@]}"
expect_rc stat 0
expect_in stat out "^size: +4 MiB \($REGION_SIZE_BYTES bytes\)"
expect_in stat out "^backing: +file"
expect_in stat out "^transport: +tcp"

head -c 1048576 /dev/urandom >"$WORK/input"
run write "$MF" write "$URL/data" 4K "${C[@]}" <"$WORK/input"
expect_rc write 0
expect_in write err "wrote 1 MiB \(1048576 bytes\)"
run read-back "$MF" read "$URL/data" 4096 1M "${C[@]}"
expect_rc read-back 0
if cmp -s "$WORK/input" "$WORK/read-back.out"; then pass "read-back: bytes equal those written"; else fail "read-back: bytes differ"; fi
run read-zero "$MF" read "$URL/data" 0 4K "${C[@]}"
expect_rc read-zero 0
if cmp -s "$WORK/read-zero.out" <(head -c 4096 /dev/zero); then pass "read-zero: untouched page is zero"; else fail "read-zero: untouched page is not zero"; fi

if command -v script >/dev/null; then  # a pseudo-terminal on stdout
  script -qec "'$MF' read '$URL/data' 0 16 --secret-file '$SECRET'" /dev/null >"$WORK/tty.out" 2>"$WORK/tty.err"
  RC=$?
  expect_rc tty 2
  expect_in tty out "refusing to write binary data to a terminal"
fi

run read-past-end "$MF" read "$URL/data" 4M 1 "${C[@]}"
expect_rc read-past-end 2
expect_in read-past-end err "$REGION_SIZE_BYTES bytes"
head -c 8192 /dev/zero >"$WORK/small"
run write-past-end "$MF" write "$URL/data" 4092K "${C[@]}" <"$WORK/small"
expect_rc write-past-end 2
expect_in write-past-end err "does not fit"
run bad-offset "$MF" read "$URL/data" 12Q 1 "${C[@]}"
expect_rc bad-offset 2
expect_in bad-offset err "bad OFFSET '12Q'"

run missing "$MF" stat "$URL/nosuch" "${C[@]}"
expect_rc missing 1
expect_in missing err "nosuch"
expect_in missing err "memfabric ls $URL"
run missing-read "$MF" read "$URL/nosuch" 0 1 "${C[@]}"
expect_rc missing-read 1
expect_in missing-read err "memfabric create $URL/nosuch"
run no-region "$MF" stat "$URL" "${C[@]}"
expect_rc no-region 2
expect_in no-region err "names no region"

run wrong-secret "$MF" ls "$URL" --secret-file "$WRONG_SECRET"
if ((RC != 0)); then pass "wrong-secret: exit $RC"; else fail "wrong-secret: exit 0"; fi
expect_in wrong-secret err "secret"
expect_not_in wrong-secret out "data"
run no-secret "$MF" ls "$URL"
expect_rc no-secret 2
expect_in no-secret err "no secret: set MEMFABRIC_SECRET or pass --secret-file"
run insecure-client "$MF" ls "$URL" --insecure
if ((RC != 0)); then pass "insecure-client: exit $RC"; else fail "insecure-client: exit 0 against a server with a secret"; fi
run env-secret env MEMFABRIC_SECRET="$(cat "$SECRET")" "$MF" ls "$URL"
expect_rc env-secret 0
expect_in env-secret out "^data "
run refused "$MF" ls tcp://127.0.0.1:1 "${C[@]}"
expect_rc refused 1
expect_in refused err "memfabric serve"

# A server that accepts but never answers: --connect-timeout bounds the wait, and the
# error says what timed out and how to wait longer.
python3 -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True); time.sleep(60)' >"$WORK/silent.port" &
SILENT_PID=$!
for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do [[ -s "$WORK/silent.port" ]] && break; sleep 0.1; done
SILENT_URL="tcp://127.0.0.1:$(cat "$WORK/silent.port")"
started=$SECONDS
run silent "$MF" ls "$SILENT_URL" --connect-timeout 1s "${C[@]}"
expect_rc silent 1
expect_in silent err "timed out"
expect_in silent err "raise --connect-timeout"
if ((SECONDS - started <= 4)); then pass "silent: gave up within 4 s"; else fail "silent: took $((SECONDS - started)) s with --connect-timeout 1s"; fi
run silent-env env MEMFABRIC_CONNECT_TIMEOUT=1s "$MF" ls "$SILENT_URL" "${C[@]}"
expect_rc silent-env 1
expect_in silent-env err "timed out"
kill "$SILENT_PID" 2>/dev/null
wait "$SILENT_PID" 2>/dev/null
run bad-timeout "$MF" ls "$URL" --connect-timeout 0 "${C[@]}"
expect_rc bad-timeout 2
expect_in bad-timeout err "--connect-timeout .*'0' is not a positive duration"
run bad-timeout-env env MEMFABRIC_CONNECT_TIMEOUT=soon "$MF" ls "$URL" "${C[@]}"
expect_rc bad-timeout-env 2
expect_in bad-timeout-env err "MEMFABRIC_CONNECT_TIMEOUT"

run create "$MF" create "$URL/scratch" --size 1M --backing memfd "${C[@]}"
expect_rc create 0
expect_in create out "created .*scratch: 1 MiB, backing memfd"
run create-again "$MF" create "$URL/scratch" --size 1M "${C[@]}"
expect_rc create-again 1
expect_in create-again err "memfabric rm $URL/scratch"
run create-bad-size "$MF" create "$URL/other" --size 12Q "${C[@]}"
expect_rc create-bad-size 2
run ls-two "$MF" ls "$URL" "${C[@]}"
expect_in ls-two out "^scratch +1 MiB"
run rm "$MF" rm "$URL/scratch" "${C[@]}"
expect_rc rm 0
run ls-after-rm "$MF" ls "$URL" "${C[@]}"
expect_not_in ls-after-rm out "^scratch"
run rm-missing "$MF" rm "$URL/scratch" "${C[@]}"
expect_rc rm-missing 1

run bench "$MF" bench "$URL/data" --seconds 0.2 --depth 4 --json "${C[@]}"
expect_rc bench 0
expect_in bench out "\"transport\": \"tcp\""
expect_in bench out "\"pattern\": \"randread\", \"block\": 4096, \"depth\": 4"
run bench-table "$MF" bench "$URL/data" --seconds 0.2 --pattern randread "${C[@]}"
expect_rc bench-table 0
expect_in bench-table out "transport tcp"
expect_in bench-table out "^randread +4 KiB +1 "
run bench-bad "$MF" bench "$URL/data" --pattern sideways "${C[@]}"
expect_rc bench-bad 2
expect_in bench-bad err "unknown pattern 'sideways'"

# ---- mount --uffd: the region as this process's memory -------------------------------
run mount-hash "$MF" mount --uffd "$URL/data" "${C[@]}"
expect_rc mount-hash 0
expect_in mount-hash err "mapped 4 MiB of 'data' .* over tcp: chunk 64 KiB, prefetch on, write tracking off"
run whole "$MF" read "$URL/data" 0 4M "${C[@]}"
expected_hash=$(xxhsum -H3 "$WORK/whole.out" | sed -E 's/.*= ([0-9a-f]+)$/\1/')
expect_in mount-hash out "^XXH3_64 $expected_hash  data "
run mount-fill "$MF" mount --uffd "$URL/data" --writable --chunk 4K --no-prefetch --fill 0x5a --offset 8K \
  --length 12K "${C[@]}"
expect_rc mount-fill 0
expect_in mount-fill out "filled 12 KiB at offset 8192 with 0x5a and synced"
run after-fill "$MF" read "$URL/data" 8K 12K "${C[@]}"
if cmp -s "$WORK/after-fill.out" <(head -c 12288 /dev/zero | tr '\0' 'Z'); then
  pass "mount-fill: the server holds the bytes written through the mapping"
else
  fail "mount-fill: the server does not hold the bytes written through the mapping"
fi
run mount-ro-fill "$MF" mount --uffd "$URL/data" --fill 1 "${C[@]}"
expect_rc mount-ro-fill 2
expect_in mount-ro-fill err "add --writable"
run mount-bad-chunk "$MF" mount --uffd "$URL/data" --chunk 3K "${C[@]}"
expect_rc mount-bad-chunk 2
expect_in mount-bad-chunk err "power of two"
run mount-no-view "$MF" mount "$URL/data" "${C[@]}"
expect_rc mount-no-view 2
expect_in mount-no-view err "--uffd"
for bad in zz 0x5aZZ 256 -1; do
  run mount-bad-fill "$MF" mount --uffd "$URL/data" --writable --fill "$bad" "${C[@]}"
  expect_rc mount-bad-fill 2
  expect_in mount-bad-fill err "bad --fill '$bad': a byte value"
done
run mount-offset-alone "$MF" mount --uffd "$URL/data" --writable --offset 4K "${C[@]}"
expect_rc mount-offset-alone 2
expect_in mount-offset-alone err "add --fill"
run mount-nbd-chunk "$MF" mount --nbd "$URL/data" --chunk 4K "${C[@]}"
expect_rc mount-nbd-chunk 2
expect_in mount-nbd-chunk err "go with --uffd only"
# SIGINT while hashing a region far too large to finish: it stops within a step and says so.
run create-big "$MF" create "$URL/big" --size 1G --backing memfd "${C[@]}"
expect_rc create-big 0
"$MF" mount --uffd "$URL/big" --chunk 4K --no-prefetch "${C[@]}" >"$WORK/mount-sigint.out" \
  2>"$WORK/mount-sigint.err" &
hash_pid=$!
sleep 1
signal_and_wait "$hash_pid" INT mount-sigint
expect_rc mount-sigint 130
expect_in mount-sigint err "SIGINT: stopped hashing after [0-9.]+ [KMG]iB of 1 GiB"
expect_not_in mount-sigint out "XXH3_64"
run rm-big "$MF" rm "$URL/big" "${C[@]}"
expect_rc rm-big 0
# With prefetch the pulls may all be done before a scan touches its first page (0 faults);
# without, each of the 256 chunks of 16 KiB faults at least once in each scan.
run bench-uffd "$MF" bench "$URL/data" --uffd --chunk 16K --json "${C[@]}"
expect_rc bench-uffd 0
expect_in bench-uffd out '"view":"uffd","size":4194304,"chunk":16384,"prefetch":true'
expect_in bench-uffd out '"order":"seq","mb_per_s":[0-9.]+,"faults":[0-9]+\},\{"order":"random","mb_per_s":[0-9.]+,'
run bench-uffd-pull "$MF" bench "$URL/data" --uffd --chunk 16K --no-prefetch --json "${C[@]}"
expect_rc bench-uffd-pull 0
expect_in bench-uffd-pull out '"prefetch":false'
for order in seq random; do
  faults=$(sed -n "s/.*\"order\":\"$order\",\"mb_per_s\":[0-9.]*,\"faults\":\([0-9]*\)}.*/\1/p" "$WORK/bench-uffd-pull.out")
  if ((${faults:-0} >= 256)); then pass "bench-uffd-pull: $order scan faulted $faults times"; else fail "bench-uffd-pull: $order scan faulted ${faults:-?} times, not at least 256: $(head -c 600 "$WORK/bench-uffd-pull.out")"; fi
done
run mount-help "$MF" mount --help
expect_rc mount-help 0
expect_in mount-help out "Example"

# ---- nbd: the region over the NBD protocol, for libnbd's tools ------------------------
# stop_nbd LABEL: SIGTERM to the `memfabric nbd` in $NBD_PID, which must exit 0.
stop_nbd() {
  kill -TERM "$NBD_PID"
  local rc=0
  wait "$NBD_PID" || rc=$?
  NBD_PID=""
  if ((rc == 0)); then pass "$1: exit 0 on SIGTERM"; else fail "$1: exit $rc on SIGTERM"; fi
}
if command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null; then
  NBD_SOCK="$WORK/nbd.sock"
  "$MF" nbd "$URL/data" --listen "unix:$NBD_SOCK" --writable "${C[@]}" 2>"$WORK/nbd-serve.log" &
  NBD_PID=$!
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    [[ -S "$NBD_SOCK" ]] && break
    sleep 0.1
  done
  run nbdinfo nbdinfo --json "nbd+unix:///data?socket=$NBD_SOCK"
  expect_rc nbdinfo 0
  expect_in nbdinfo out '"export-size": 4194304'
  expect_in nbdinfo out '"is_read_only": false'
  head -c 1048576 /dev/urandom >"$WORK/nbd-pattern"
  run nbdcopy nbdcopy "$WORK/nbd-pattern" "nbd+unix:///data?socket=$NBD_SOCK"
  expect_rc nbdcopy 0
  run nbd-readback "$MF" read "$URL/data" 0 1M "${C[@]}"
  if cmp -s "$WORK/nbd-pattern" "$WORK/nbd-readback.out"; then
    pass "nbd: the server holds what nbdcopy wrote"
  else
    fail "nbd: the server does not hold what nbdcopy wrote"
  fi
  stop_nbd "nbd"
  if grep -q "nbd: connection .* serves 'data'" "$WORK/nbd-serve.log"; then
    pass "nbd: logged its connections"
  else
    fail "nbd: no connection in its log: $(head -c 600 "$WORK/nbd-serve.log")"
  fi
  # The same on TCP, on a port the kernel picks: the log says where.
  "$MF" nbd "$URL/data" --listen 127.0.0.1:0 "${C[@]}" 2>"$WORK/nbd-tcp.log" &
  NBD_PID=$!
  NBD_TCP_URI=""
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    NBD_TCP_URI=$(grep -so 'nbd://127\.0\.0\.1:[0-9]*/data' "$WORK/nbd-tcp.log" | head -1)
    [[ -n "$NBD_TCP_URI" ]] && break
    sleep 0.1
  done
  run nbdinfo-tcp nbdinfo --json "$NBD_TCP_URI"
  expect_rc nbdinfo-tcp 0
  expect_in nbdinfo-tcp out '"export-size": 4194304'
  expect_in nbdinfo-tcp out '"is_read_only": true'
  run nbd-tcp-read nbdcopy "$NBD_TCP_URI" -
  if cmp -s -n 1048576 "$WORK/nbd-pattern" "$WORK/nbd-tcp-read.out"; then
    pass "nbd --listen 127.0.0.1:0: reads the region over TCP"
  else
    fail "nbd --listen 127.0.0.1:0: reads other bytes over TCP"
  fi
  stop_nbd "nbd on TCP"
else
  echo "skip nbd: nbdinfo/nbdcopy (libnbd-bin) not installed"
fi
run nbd-no-listen "$MF" nbd "$URL/data" "${C[@]}"
expect_rc nbd-no-listen 2
expect_in nbd-no-listen err "--listen"
run swap-bad-device "$MF" swap "$URL/data" /dev/sda "${C[@]}"
expect_rc swap-bad-device 2
expect_in swap-bad-device err "not an NBD device"
run mount-uffd-device "$MF" mount --uffd "$URL/data" /dev/nbd0 "${C[@]}"
expect_rc mount-uffd-device 2
expect_in mount-uffd-device err "go with --nbd only"
if [[ ! -e /sys/module/nbd ]]; then  # a host without the NBD driver: the error says so
  run mount-nbd-nodriver "$MF" mount --nbd "$URL/data" "${C[@]}"
  expect_rc mount-nbd-nodriver 1
  expect_in mount-nbd-nodriver err "no NBD driver"
fi

# ---- a client may create file-backed regions only inside the server's --store -------
run create-file-nostore "$MF" create "$URL/f" --size 64K --backing "file:f.img" "${C[@]}"
expect_rc create-file-nostore 1
expect_in create-file-nostore err "--store"

# ---- restart: a file-backed region keeps its data ------------------------------------
# bench wrote random data: put the known bytes back first.
run rewrite "$MF" write "$URL/data" 4K "${C[@]}" <"$WORK/input"
expect_rc rewrite 0
stop_server
if grep -q "flushed" "$WORK/serve.log"; then pass "serve: logged the flush"; else fail "serve: no flush in its log"; fi
start_server
run read-after-restart "$MF" read "$URL/data" 4K 1M "${C[@]}"
expect_rc read-after-restart 0
if cmp -s "$WORK/input" "$WORK/read-after-restart.out"; then
  pass "restart: file-backed data survived"
else
  fail "restart: file-backed data lost"
fi
stop_server

# ---- TLS: a self-signed certificate for 127.0.0.1 ------------------------------------
if command -v openssl >/dev/null; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
  rm -f "$WORK/port"
  "$MF" serve --listen 127.0.0.1:0 --port-file "$WORK/port" --insecure --region t=1M \
    --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" 2>>"$WORK/tls-serve.log" &
  SERVE_PID=$!
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do [[ -s "$WORK/port" ]] && break; sleep 0.1; done
  TLS_PORT=$(cat "$WORK/port" 2>/dev/null)
  echo tls-hello >"$WORK/tls-in"
  run tls-write "$MF" write "tls://127.0.0.1:$TLS_PORT/t" 0 --insecure --tls-ca "$WORK/cert.pem" <"$WORK/tls-in"
  expect_rc tls-write 0
  run tls-read "$MF" read "tls://127.0.0.1:$TLS_PORT/t" 0 10 --insecure --tls-ca "$WORK/cert.pem"
  expect_rc tls-read 0
  if cmp -s "$WORK/tls-in" "$WORK/tls-read.out"; then pass "tls: round trip"; else fail "tls: round trip differs"; fi
  run tls-stat "$MF" stat "tls://127.0.0.1:$TLS_PORT/t" --insecure --tls-ca "$WORK/cert.pem"
  expect_in tls-stat out "^transport: +tls"
  run tls-no-ca "$MF" ls "tls://127.0.0.1:$TLS_PORT" --insecure
  if ((RC != 0)); then pass "tls-no-ca: exit $RC"; else fail "tls-no-ca: exit 0 with an unverified certificate"; fi
  expect_in tls-no-ca err "--tls-ca"
  run tls-as-tcp "$MF" ls "tcp://127.0.0.1:$TLS_PORT" --insecure
  if ((RC != 0)); then pass "tls-as-tcp: exit $RC"; else fail "tls-as-tcp: exit 0"; fi
  expect_in tls-as-tcp err "tls://"
  run tls-flags-tcp "$MF" ls "tcp://127.0.0.1:$TLS_PORT" --insecure --tls-ca "$WORK/cert.pem"
  expect_rc tls-flags-tcp 2
  stop_server
fi

# ---- --cache: the views on a managed mount (a local copy pulled in the background) ------
start_server
run mount-cache-fill "$MF" mount --uffd "$URL/data" --writable --cache --fill 0x33 --offset 64K --length 64K \
  "${C[@]}"
expect_rc mount-cache-fill 0
expect_in mount-cache-fill err "cache of 'data': 4 MiB, chunk 64 KiB, local copy in memory"
expect_in mount-cache-fill err "over mount\+tcp: chunk 64 KiB, prefetch off"
expect_in mount-cache-fill err "cache: pushed 64 KiB \(1 chunks"
run after-cache-fill "$MF" read "$URL/data" 64K 64K "${C[@]}"
if cmp -s "$WORK/after-cache-fill.out" <(head -c 65536 /dev/zero | tr '\0' '3'); then
  pass "mount-cache-fill: the server holds the bytes written through the cache"
else
  fail "mount-cache-fill: the server does not hold the bytes written through the cache"
fi
run nbd-cache-alone "$MF" nbd "$URL/data" --listen "unix:$WORK/unused.sock" --push-interval 2s "${C[@]}"
expect_rc nbd-cache-alone 2
expect_in nbd-cache-alone err "go with --cache"
if command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null; then
  CACHE_SOCK="$WORK/nbd-cache.sock"
  CACHE_URI="nbd+unix:///data?socket=$CACHE_SOCK"
  "$MF" nbd "$URL/data" --listen "unix:$CACHE_SOCK" --writable --cache --cache-file "$WORK/cache.img" \
    --push-interval 10s "${C[@]}" 2>"$WORK/nbd-cache.log" &
  NBD_PID=$!
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    [[ -S "$CACHE_SOCK" ]] && break
    sleep 0.1
  done
  run nbd-cache-info nbdinfo --json "$CACHE_URI"
  expect_rc nbd-cache-info 0
  expect_in nbd-cache-info out '"export-size": 4194304'
  head -c 2097152 /dev/urandom >"$WORK/cache-pattern"
  run nbd-cache-copy nbdcopy --flush "$WORK/cache-pattern" "$CACHE_URI"
  expect_rc nbd-cache-copy 0
  # The push interval is long: the flush is what put the bytes on the server.
  run nbd-cache-server "$MF" read "$URL/data" 0 2M "${C[@]}"
  if cmp -s "$WORK/cache-pattern" "$WORK/nbd-cache-server.out"; then
    pass "nbd --cache: the server holds what nbdcopy wrote after its flush"
  else
    fail "nbd --cache: the server does not hold what nbdcopy wrote after its flush"
  fi
  # CAN_MULTI_CONN: a FLUSH on one connection covers the completed writes of another.
  if command -v nbdsh >/dev/null; then
    head -c 65536 /dev/urandom >"$WORK/multi-pattern"
    # nbdsh runs `python3 -m nbd`: the system python3, which has libnbd's module
    run nbd-multi-conn env PATH="/usr/bin:/bin:$PATH" nbdsh -n -c "
import nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri('$CACHE_URI')
b.connect_uri('$CACHE_URI')
assert a.can_multi_conn() and b.can_multi_conn()
b.pwrite(open('$WORK/multi-pattern', 'rb').read(), 3 << 20)
a.flush()
"
    expect_rc nbd-multi-conn 0
    run nbd-multi-server "$MF" read "$URL/data" 3M 64K "${C[@]}"
    if cmp -s "$WORK/multi-pattern" "$WORK/nbd-multi-server.out"; then
      pass "nbd --cache: a flush on one connection put another connection's write on the server"
    else
      fail "nbd --cache: a flush on one connection did not push another connection's write"
    fi
  fi
  run nbd-cache-back nbdcopy "$CACHE_URI" -
  expect_rc nbd-cache-back 0
  if cmp -s -n 2097152 "$WORK/cache-pattern" "$WORK/nbd-cache-back.out"; then
    pass "nbd --cache: reads back what nbdcopy wrote"
  else
    fail "nbd --cache: reads back other bytes"
  fi
  if cmp -s -n 2097152 "$WORK/cache-pattern" "$WORK/cache.img"; then
    pass "nbd --cache: the --cache-file holds the local copy"
  else
    fail "nbd --cache: the --cache-file lacks the written bytes"
  fi
  sleep 1.5  # at least one progress line
  stop_nbd "nbd --cache"
  cp "$WORK/nbd-cache.log" "$WORK/nbd-cache.err"
  expect_in nbd-cache err "cache of 'data': 4 MiB, chunk 64 KiB, local copy in $WORK/cache.img, writes pushed every 10000 ms"
  expect_in nbd-cache err "^cache: local 100% \(4 MiB of 4 MiB\), dirty 0 B, pull [0-9.]+ MB/s, push [0-9.]+ MB/s$"
  # 2 MiB from nbdcopy, 64 KiB from the multi-conn check when nbdsh is there
  if command -v nbdsh >/dev/null; then pushed="2.1 MiB \(33 chunks"; else pushed="2 MiB \(32 chunks"; fi
  expect_in nbd-cache err "^cache: pushed $pushed, [0-9.]+ MB/s\), pulled [0-9.]+ [KM]i?B"
else
  echo "skip nbd --cache: nbdinfo/nbdcopy (libnbd-bin) not installed"
fi
stop_server

# ---- migrate: recv and send as two processes over loopback TCP ------------------------
MIG_RECV_PID=""
MIG_SEND_PID=""
cleanup_migrate() {
  [[ -n "$MIG_RECV_PID" ]] && kill -KILL "$MIG_RECV_PID" 2>/dev/null
  [[ -n "$MIG_SEND_PID" ]] && kill -KILL "$MIG_SEND_PID" 2>/dev/null
  cleanup
}
trap cleanup_migrate EXIT
# wait_for FILE REGEX: until FILE matches REGEX (10 s); false if it never does.
wait_for() {
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    grep -Eq -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# wait_exit NAME PID: waits (10 s at most, then kills) and sets RC to its exit status.
wait_exit() {
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$2" 2>/dev/null && { fail "$1: still running after 10 s"; kill -KILL "$2"; }
  RC=0
  wait "$2" || RC=$?
}
# start_recv NAME ARGS...: `migrate recv` in the background on a free port; sets MIG_RECV_PID, MIG_PORT.
start_recv() {
  local name=$1
  shift
  rm -f "$WORK/mig-port"
  "$MF" migrate recv "$URL/$MIG_REGION" --listen 127.0.0.1:0 --port-file "$WORK/mig-port" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  MIG_RECV_PID=$!
  wait_for "$WORK/mig-port" . || fail "$name: no port file: $(head -c 600 "$WORK/$name.err")"
  MIG_PORT=$(cat "$WORK/mig-port")
}
# expect_region NAME FILE: the server's region $MIG_REGION holds exactly FILE's bytes.
expect_region() {
  run "$1-read" "$MF" read "$URL/$MIG_REGION" 0 "$(stat -c %s "$2")" "${C[@]}"
  if cmp -s "$2" "$WORK/$1-read.out"; then pass "$1: the region holds the expected bytes"; else fail "$1: the region's bytes differ"; fi
}
# patch FILE OFFSET_4K PATCH: writes PATCH into FILE at block OFFSET_4K (4 KiB blocks).
patch() { dd if="$3" of="$1" bs=4096 seek="$2" conv=notrunc status=none; }
# nbd_pwrite SOCKET FILE OFFSET: writes FILE at OFFSET through the NBD export on SOCKET.
nbd_pwrite() {
  PATH=/usr/bin:$PATH nbdsh -u "nbd+unix:///$MIG_REGION?socket=$1" -c "h.pwrite(open('$2', 'rb').read(), $3)"
}
MIG_REGION=data
HAVE_NBDSH=0
PATH=/usr/bin:$PATH nbdsh -c 'pass' >/dev/null 2>&1 && HAVE_NBDSH=1

for sub in recv send; do
  run "help-migrate-$sub" "$MF" migrate "$sub" --help
  expect_rc "help-migrate-$sub" 0
  expect_in "help-migrate-$sub" out "Example"
  expect_in "help-migrate-$sub" out "NOT encrypted"
done
run migrate-no-sub "$MF" migrate
expect_rc migrate-no-sub 2
run migrate-insecure-remote "$MF" migrate send tcp://127.0.0.1:1/data --to 192.0.2.1:7412 --insecure
expect_rc migrate-insecure-remote 2
expect_in migrate-insecure-remote err "loopback"
run migrate-bad-chunk "$MF" migrate recv tcp://127.0.0.1:1/data --listen 127.0.0.1:0 --chunk 3K "${C[@]}"
expect_rc migrate-bad-chunk 2
expect_in migrate-bad-chunk err "power of two"
run migrate-both-finalize "$MF" migrate send tcp://127.0.0.1:1/data --to 127.0.0.1:1 --finalize-after 1 \
  --finalize-on-signal "${C[@]}"
expect_rc migrate-both-finalize 2

start_server
head -c 4194304 /dev/urandom >"$WORK/mig-expected"
run mig-write "$MF" write "$URL/data" 0 "${C[@]}" <"$WORK/mig-expected"
expect_rc mig-write 0

# 1. The plain hand-over: the destination syncs, releases the lease and exits.
start_recv mig-recv "${C[@]}"
run mig-send "$MF" migrate send "$URL/data" --to "127.0.0.1:$MIG_PORT" "${C[@]}"
expect_rc mig-send 0
expect_in mig-send err "downtime +[0-9.]+ ms = suspend [0-9.]+ \+ push [0-9.]+ \+ hand-over [0-9.]+ \+ lease [0-9.]+ \+ re-pull"
expect_in mig-send out "^migrated 'data' to 127.0.0.1:$MIG_PORT: downtime [0-9.]+ ms"
wait_exit mig-recv "$MIG_RECV_PID"
MIG_RECV_PID=""
expect_rc mig-recv 0
expect_in mig-recv err "channel authenticated, not encrypted"
expect_in mig-recv err "pre-copy complete: 4 MiB"
expect_in mig-recv out "^migrated 'data' \(4 MiB\) from .*write lease released"
expect_region mig-plain "$WORK/mig-expected"

# 2. Writes through the source's NBD export during pre-copy, then through the destination's.
if ((HAVE_NBDSH)); then
  start_recv mig-nbd-recv --nbd-listen "unix:$WORK/mig-dst.sock" "${C[@]}"
  "$MF" migrate send "$URL/data" --to "127.0.0.1:$MIG_PORT" --nbd-listen "unix:$WORK/mig-src.sock" \
    --finalize-on-signal --suspend-cmd "touch $WORK/mig-suspended" "${C[@]}" \
    >"$WORK/mig-nbd-send.out" 2>"$WORK/mig-nbd-send.err" &
  MIG_SEND_PID=$!
  wait_for "$WORK/mig-nbd-send.err" "pre-copy of 'data'" || fail "mig-nbd-send: did not start: $(head -c 600 "$WORK/mig-nbd-send.err")"
  head -c 200000 /dev/urandom >"$WORK/mig-patch1"  # not chunk-aligned on purpose
  if nbd_pwrite "$WORK/mig-src.sock" "$WORK/mig-patch1" 1052672; then pass "mig-nbd: wrote through the source's export"; else fail "mig-nbd: nbdsh write to the source failed"; fi
  patch "$WORK/mig-expected" 257 "$WORK/mig-patch1"  # 1052672 = 257 x 4 KiB
  wait_for "$WORK/mig-nbd-recv.err" "pre-copy complete" || fail "mig-nbd-recv: no pre-copy: $(head -c 600 "$WORK/mig-nbd-recv.err")"
  head -c 8192 /dev/urandom >"$WORK/mig-patch2"  # after the destination pulled it all: re-pulled
  nbd_pwrite "$WORK/mig-src.sock" "$WORK/mig-patch2" 0 || fail "mig-nbd: second nbdsh write failed"
  patch "$WORK/mig-expected" 0 "$WORK/mig-patch2"
  kill -USR1 "$MIG_SEND_PID"
  wait_exit mig-nbd-send "$MIG_SEND_PID"
  MIG_SEND_PID=""
  expect_rc mig-nbd-send 0
  expect_in mig-nbd-send err "dirty +[1-9][0-9]* chunks"
  if [[ -e "$WORK/mig-suspended" ]]; then pass "mig-nbd: --suspend-cmd ran"; else fail "mig-nbd: --suspend-cmd did not run"; fi
  wait_for "$WORK/mig-nbd-recv.err" "serving 'data' read-write" || fail "mig-nbd-recv: no export: $(head -c 600 "$WORK/mig-nbd-recv.err")"
  run mig-busy "$MF" write "$URL/data" 0 "${C[@]}" <"$WORK/mig-patch2"
  expect_rc mig-busy 1
  expect_in mig-busy err "write lease"
  head -c 4096 /dev/urandom >"$WORK/mig-patch3"
  if nbd_pwrite "$WORK/mig-dst.sock" "$WORK/mig-patch3" 3145728; then pass "mig-nbd: wrote through the destination's export"; else fail "mig-nbd: nbdsh write to the destination failed"; fi
  patch "$WORK/mig-expected" 768 "$WORK/mig-patch3"
  kill -TERM "$MIG_RECV_PID"
  wait_exit mig-nbd-recv "$MIG_RECV_PID"
  MIG_RECV_PID=""
  expect_rc mig-nbd-recv 0
  expect_region mig-nbd "$WORK/mig-expected"
  run mig-new-writer "$MF" write "$URL/data" 0 "${C[@]}" <"$WORK/mig-patch3"
  expect_rc mig-new-writer 0
  patch "$WORK/mig-expected" 0 "$WORK/mig-patch3"
else
  echo "skip migrate over NBD: nbdsh (libnbd-bin, python3-libnbd) not installed"
fi

# 3. A wrong secret on the channel: refused; the source keeps the region.
start_recv mig-wrong-recv --channel-secret-file "$WRONG_SECRET" "${C[@]}"
run mig-wrong-send "$MF" migrate send "$URL/data" --to "127.0.0.1:$MIG_PORT" "${C[@]}"
expect_rc mig-wrong-send 1
expect_in mig-wrong-send err "different secrets"
expect_in mig-wrong-send err "nothing is lost"
wait_for "$WORK/mig-wrong-recv.err" "refused a connection from 127.0.0.1" || fail "mig-wrong-recv: did not say it refused: $(head -c 600 "$WORK/mig-wrong-recv.err")"
if kill -0 "$MIG_RECV_PID" 2>/dev/null; then pass "mig-wrong-recv: still waiting for a source"; else fail "mig-wrong-recv: exited"; fi
kill -TERM "$MIG_RECV_PID"
wait_exit mig-wrong-recv "$MIG_RECV_PID"
MIG_RECV_PID=""
expect_rc mig-wrong-recv 1
expect_in mig-wrong-recv err "SIGTERM before a source connected"
expect_in mig-wrong-recv err "nothing was migrated"
expect_region mig-wrong "$WORK/mig-expected"

# 4. The destination killed mid-pull: the source aborts, exits 1, loses nothing. A 32 MiB
# region pulled in 4 KiB chunks takes most of a second over loopback.
MIG_REGION=mig32
run mig32-create "$MF" create "$URL/mig32" --size 32M --backing memfd "${C[@]}"
expect_rc mig32-create 0
head -c 33554432 /dev/urandom >"$WORK/mig32-expected"
run mig32-write "$MF" write "$URL/mig32" 0 "${C[@]}" <"$WORK/mig32-expected"
expect_rc mig32-write 0
start_recv mig-kill-recv --chunk 4K "${C[@]}"
SEND_EXTRA=()
((HAVE_NBDSH)) && SEND_EXTRA=(--nbd-listen "unix:$WORK/mig-src2.sock")
"$MF" migrate send "$URL/mig32" --to "127.0.0.1:$MIG_PORT" --finalize-on-signal "${SEND_EXTRA[@]}" "${C[@]}" \
  >"$WORK/mig-kill-send.out" 2>"$WORK/mig-kill-send.err" &
MIG_SEND_PID=$!
wait_for "$WORK/mig-kill-send.err" "pre-copy of 'mig32'" || fail "mig-kill-send: did not start: $(head -c 600 "$WORK/mig-kill-send.err")"
if ((HAVE_NBDSH)); then  # the source's workload writes during the pre-copy
  head -c 65536 /dev/urandom >"$WORK/mig-patch4"
  nbd_pwrite "$WORK/mig-src2.sock" "$WORK/mig-patch4" 2097152 && patch "$WORK/mig32-expected" 512 "$WORK/mig-patch4"
fi
kill -KILL "$MIG_RECV_PID"
wait "$MIG_RECV_PID" 2>/dev/null
MIG_RECV_PID=""
if grep -q "pre-copy complete" "$WORK/mig-kill-recv.err"; then
  echo "note: the destination finished its pre-copy before it was killed"
fi
wait_exit mig-kill-send "$MIG_SEND_PID"
MIG_SEND_PID=""
expect_rc mig-kill-send 1
expect_in mig-kill-send err "aborted"
expect_in mig-kill-send err "nothing is lost"
expect_region mig-kill "$WORK/mig32-expected"
run mig-after-kill "$MF" write "$URL/mig32" 0 "${C[@]}" <"$WORK/mig-patch2"
expect_rc mig-after-kill 0
stop_server

echo "cli_test: $CHECKS checks, $FAILURES failed"
((FAILURES == 0))
