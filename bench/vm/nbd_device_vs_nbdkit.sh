#!/usr/bin/env bash
# Runs inside the test VM: the kernel's NBD block device backed by `nbdkit memory` (through
# nbd-client on a unix socket) vs backed by memfabric (`memfabric mount --nbd` on a region
# that `memfabric serve` holds in the same guest, over tcp:// and rdma://), the same fio
# jobs on each /dev/nbdX, and the ratios memfabric/nbdkit. All figures come from one boot.
#
#   tests/vm/run-in-vm --timeout 1200 --results /tmp/nbd-bench -- \
#       env MEMFABRIC=$PWD/build/release/tools/memfabric bench/vm/nbd_device_vs_nbdkit.sh
#
# Rows: 4 KiB randread/randwrite at QD1 and QD16, 1 MiB read/write at QD4 (fio, libaio,
# O_DIRECT, one job). Both backends get 4 connections. nbdkit serves from its own memory;
# memfabric's device goes through its Export, a transport and a server process, so the
# ratio is the cost of the remote path on one (emulated) machine.
# Environment: MEMFABRIC (the binary), ROW_SECONDS (default 3), SCHEMES (default "tcp rdma").
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/../../tests/vm/guest/lib.sh"
need_vm
: "${MEMFABRIC:?set MEMFABRIC to the memfabric binary}"
ROW_SECONDS=${ROW_SECONDS:-3}
SCHEMES=${SCHEMES:-tcp rdma}
readonly SIZE_MIB=256 CONNECTIONS=4 PY=/usr/bin/python3
WORK=$(mktemp -d)
ROWS=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1m 4" "write 1m 4")

# run_rows NAME DEV: every fio row on DEV; "NAME ROW VALUE" lines (IOPS for 4k, MiB/s for 1m).
run_rows() {
  local name=$1 dev=$2 row rw bs depth
  for row in "${ROWS[@]}"; do
    read -r rw bs depth <<<"$row"
    fio --name=row --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$depth" --ioengine=libaio \
      --direct=1 --time_based --runtime="$ROW_SECONDS" --ramp_time=1 --size=$((SIZE_MIB - 8))M \
      --output-format=json >"$WORK/$name-$rw-$bs-$depth.json" || fail "fio $row on $dev ($name)"
    "$PY" - "$WORK/$name-$rw-$bs-$depth.json" "$name" "$rw $bs QD$depth" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
unit_iops = sys.argv[3].split()[1] == "4k"
print(sys.argv[2], sys.argv[3].replace(" ", "_"), side["iops"] if unit_iops else side["bw"] / 1024)
EOF
  done
}

note "nbdkit memory ${SIZE_MIB}M + nbd-client (${CONNECTIONS} connections)"
spawn nbdkit -f -U "$WORK/nbdkit.sock" memory "${SIZE_MIB}M"
wait_path -S "$WORK/nbdkit.sock"
nbd-client -unix "$WORK/nbdkit.sock" /dev/nbd1 -b 4096 -C "$CONNECTIONS" >/dev/null ||
  fail "nbd-client could not attach /dev/nbd1"
run_rows nbdkit /dev/nbd1 | tee "$WORK/results"
nbd-client -d /dev/nbd1 >/dev/null

MEMFABRIC_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export MEMFABRIC_SECRET
for scheme in $SCHEMES; do
  note "memfabric serve + mount --nbd $scheme:// (${CONNECTIONS} connections)"
  rm -f "$WORK/port"
  serve_rdma=()
  [[ $scheme == rdma ]] && serve_rdma=(--rdma on)
  spawn "$MEMFABRIC" serve --listen "$MF_VM_ADDR:0" --port-file "$WORK/port" --region "b=${SIZE_MIB}M" \
    --log-level warn "${serve_rdma[@]}"
  server=$!
  wait_path -s "$WORK/port" 60
  # rdma_cm may not answer the first connections right after the listener comes up
  # (tests/vm/guest/lib.sh): up to three attempts.
  for attempt in 1 2 3; do
    "$MEMFABRIC" mount --nbd "$scheme://$MF_VM_ADDR:$(cat "$WORK/port")/b" --writable \
      --connections "$CONNECTIONS" >"$WORK/dev-$scheme" 2>"$WORK/mount-$scheme.log" &
    pid=$!
    _spawned+=("$pid")
    deadline=$((SECONDS + 60))
    until [[ -s $WORK/dev-$scheme ]] || ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); do
      sleep 0.1
    done
    [[ -s $WORK/dev-$scheme ]] && break
    cat "$WORK/mount-$scheme.log" >&2
    ((attempt < 3)) || fail "mount --nbd over $scheme printed no device"
    kill "$pid" 2>/dev/null || true
    sleep 1
  done
  run_rows "memfabric-$scheme" "$(cat "$WORK/dev-$scheme")" | tee -a "$WORK/results"
  kill -INT "$pid"
  wait "$pid" || fail "memfabric mount --nbd ($scheme) did not detach cleanly"
  kill "$server"
  wait "$server" || true
done

"$PY" - "$WORK/results" "$SCHEMES" <<'EOF'
import sys
rows, order = {}, []
for line in open(sys.argv[1]):
    name, row, value = line.split()
    rows.setdefault(row, {})[name] = float(value)
    if row not in order:
        order.append(row)
schemes = sys.argv[2].split()
head = f"{'row':<22} {'nbdkit':>10}" + "".join(f" {'memfabric ' + s:>16} {'ratio':>6}" for s in schemes)
print("\n" + head)
for row in order:
    unit = "IOPS" if "_4k_" in row else "MiB/s"
    base = rows[row]["nbdkit"]
    line = f"{row + ' ' + unit:<22} {base:>10.0f}"
    for s in schemes:
        v = rows[row].get("memfabric-" + s, 0.0)
        line += f" {v:>16.0f} {v / base if base else 0:>5.2f}x"
    print(line)
EOF
