#!/usr/bin/env bash
# Runs inside the test VM (bench/compare_perftest.sh boots it): perftest on rxe0 first,
# then memfabric's RDMA transport on the same sizes, then memfabric over TCP in the same
# guest, and prints each ratio. All figures come from this one boot.
#
#   rows: 4 KiB read latency (ib_read_lat -R vs bench randread QD1, p50)
#         4 KiB and 64 KiB read and write bandwidth (ib_read_bw/ib_write_bw -R, 1 QP,
#         128 in flight vs bench read/write, 1 connection, depth 128)
# Environment: MEMFABRIC (the binary), ROW_SECONDS (default 3), PERFTEST_ITERS (5000).
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/../../tests/vm/guest/lib.sh"
need_vm
: "${MEMFABRIC:?set MEMFABRIC to the memfabric binary}"
ROW_SECONDS=${ROW_SECONDS:-3}
ITERS=${PERFTEST_ITERS:-5000}
DEV=$MF_VM_RDMA_DEV
ADDR=$MF_VM_ADDR
TX_DEPTH=128
PORT=7411
WORK=$(mktemp -d)

# perf_pair TOOL PORT ARGS...: runs server and client; prints the client's result line.
perf_pair() {
  local tool=$1 port=$2
  shift 2
  spawn "$tool" -R -d "$DEV" -F -p "$port" "$@" >"$WORK/$tool-server.log" 2>&1
  local server=$!
  wait_cm_listen "$port"
  cm_client "$WORK/$tool-client.log" "$tool" -R -d "$DEV" -F -p "$port" "$@" "$ADDR" ||
    { cat "$WORK/$tool-client.log" >&2; fail "$tool failed"; }
  wait "$server" || true
  grep -E '^[[:space:]]*[0-9]+[[:space:]]+[0-9]+[[:space:]]' "$WORK/$tool-client.log" | tail -1
}

note "perftest on $DEV"
lat=$(perf_pair ib_read_lat 18601 -s 4096 -n "$ITERS")
p_lat=$(awk '{print $5}' <<<"$lat")  # t_typical (median) usec
declare -A PBW
p=18602
for tool in ib_read_bw ib_write_bw; do
  for size in 4096 65536; do
    line=$(perf_pair "$tool" $p -s "$size" -n "$ITERS" -t $TX_DEPTH)
    PBW[$tool-$size]=$(awk '{print $4}' <<<"$line")  # BW average, MiB/s
    p=$((p + 1))
  done
done

(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/secret")
spawn "$MEMFABRIC" serve --listen "$ADDR:$PORT" --region b=256M --secret-file "$WORK/secret" \
  --rdma on --log-level warn
wait_cm_listen $PORT
bench() {  # bench SCHEME ARGS... -> JSON
  "$MEMFABRIC" bench "$1://$ADDR:$PORT/b" --secret-file "$WORK/secret" -q --json \
    --seconds "$ROW_SECONDS" "${@:2}"
}
field() {  # field JSON PATTERN KEY
  python3 -c 'import json,sys; d=json.load(sys.stdin); r=[x for x in d["rows"] if x["pattern"]==sys.argv[1]][0]
k=sys.argv[2]; print(r["lat_us"]["p50"] if k=="p50" else r["bytes_per_sec"]/1048576)' "$2" "$3" <<<"$1"
}
declare -A M
for scheme in rdma tcp; do
  note "memfabric over $scheme"
  j=$(bench $scheme --pattern randread --depth 1 --block 4K --connections 1)
  transport=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["transport"])' <<<"$j")
  [[ $transport == "$scheme" ]] || fail "bench ran over $transport, not $scheme"
  M[$scheme-lat]=$(field "$j" randread p50)
  for size in 4K 64K; do
    j=$(bench $scheme --pattern write,read --seq-block $size --seq-depth $TX_DEPTH --seq-connections 1)
    M[$scheme-read-$size]=$(field "$j" read bw)
    M[$scheme-write-$size]=$(field "$j" write bw)
  done
done

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}x' if b>0 else 'n/a')" "$1" "$2"; }
printf '\n%-28s %12s %14s %8s %14s %8s\n' row perftest "memfabric rdma" ratio "memfabric tcp" "rdma/tcp"
printf '%-28s %12.1f %14.1f %8s %14.1f %8s\n' "read lat 4K p50 (us)" "$p_lat" "${M[rdma-lat]}" \
  "$(ratio "${M[rdma-lat]}" "$p_lat")" "${M[tcp-lat]}" "$(ratio "${M[tcp-lat]}" "${M[rdma-lat]}")"
for op in read write; do
  for size in 4096 65536; do
    k=$((size / 1024))K
    printf '%-28s %12.1f %14.1f %8s %14.1f %8s\n' "$op bw $k (MiB/s)" "${PBW[ib_${op}_bw-$size]}" \
      "${M[rdma-$op-$k]}" "$(ratio "${M[rdma-$op-$k]}" "${PBW[ib_${op}_bw-$size]}")" "${M[tcp-$op-$k]}" \
      "$(ratio "${M[rdma-$op-$k]}" "${M[tcp-$op-$k]}")"
  done
done
echo "(latency ratio: memfabric/perftest, lower is better; bandwidth: higher is better;"
echo " rdma/tcp: latency tcp/rdma, bandwidth rdma/tcp — what RDMA buys in this guest)"
