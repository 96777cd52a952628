#!/usr/bin/env bash
# NBD server comparison on one host, peer first, same run, same client:
#   peer:      nbdkit's memory plugin (sparse RAM) on a unix socket
#   memfabric: nbd::Export (nbd/export.h) over an in-process memory region, served by
#              nbd_bench_server on a unix socket
# Both are driven by fio's nbd engine (libnbd) with the same jobs:
#   4 KiB randread QD1 and QD16, 4 KiB randwrite QD1 and QD16, 1 MiB sequential read and
#   write (QD SEQ_DEPTH). The first row on each side is a 1 MiB sequential write over the
#   whole size, so both read real (allocated) memory.
# Prints IOPS (MB/s for the 1 MiB rows), p50/p99 latency and the ratio memfabric/nbdkit.
#
# Usage: bench/compare_nbd.sh
# Environment: ROW_SECONDS (default 3), SIZE (default 1G), DEPTH (16), SEQ_DEPTH (4),
#   BACKEND=region|memory|tcp (nbd_bench_server's backend, default region),
#   NBD_BENCH_SERVER=path to a built nbd_bench_server (else the release preset is built).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROW_SECONDS=${ROW_SECONDS:-3}
SIZE=${SIZE:-1G}
DEPTH=${DEPTH:-16}
SEQ_DEPTH=${SEQ_DEPTH:-4}
BACKEND=${BACKEND:-region}
SERVER_WAIT_TRIES=100  # x 0.1 s
export PATH=/usr/bin:/bin:$PATH  # the system python3 for the table (and libnbd tools)

die() { echo "compare_nbd: $*" >&2; exit 1; }
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup (as root) to install the peers"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (Debian's fio has it)"

if [[ -z "${NBD_BENCH_SERVER:-}" ]]; then
  NBD_BENCH_SERVER="$ROOT/build/release/nbd/nbd_bench_server"
  echo "== building the release preset (nbd_bench_server)" >&2
  (cd "$ROOT" && { [[ -f build/release/build.ninja ]] || cmake --preset release >/dev/null; } &&
    cmake --build --preset release --target nbd_bench_server >/dev/null) || die "release build failed"
fi
[[ -x "$NBD_BENCH_SERVER" ]] || die "no nbd_bench_server at $NBD_BENCH_SERVER"

WORK=$(mktemp -d /tmp/mf-compare-nbd.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_socket() {
  local i
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do [[ -S "$1" ]] && return 0; sleep 0.1; done
  die "no server socket at $1"
}

# run_side SIDE URI: the six rows, JSON into $WORK/SIDE-ROW.json
run_side() {
  local side=$1 uri=$2
  run() {  # NAME RW BLOCK DEPTH [extra fio args]
    local name=$1 rw=$2 bs=$3 qd=$4
    shift 4
    echo "== $side: $rw $bs QD$qd" >&2
    fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" \
      --lat_percentiles=1 --output-format=json --output="$WORK/$side-$name.json" "$@" >/dev/null ||
      die "fio $rw on $side failed"
  }
  run fill write 1M "$SEQ_DEPTH"  # allocates every page once, untimed in the table
  run randread-4K-1 randread 4k 1 --time_based --runtime="$ROW_SECONDS"
  run randread-4K-$DEPTH randread 4k "$DEPTH" --time_based --runtime="$ROW_SECONDS"
  run randwrite-4K-1 randwrite 4k 1 --time_based --runtime="$ROW_SECONDS"
  run randwrite-4K-$DEPTH randwrite 4k "$DEPTH" --time_based --runtime="$ROW_SECONDS"
  run read-1M-$SEQ_DEPTH read 1M "$SEQ_DEPTH" --time_based --runtime="$ROW_SECONDS"
  run write-1M-$SEQ_DEPTH write 1M "$SEQ_DEPTH" --time_based --runtime="$ROW_SECONDS"
}

# ---- the peer: nbdkit memory ----------------------------------------------------------
nbdkit --foreground --exit-with-parent --unix "$WORK/nbdkit.sock" memory "$SIZE" &
PIDS+=($!)
wait_socket "$WORK/nbdkit.sock"
run_side nbdkit "nbd+unix:///?socket=$WORK/nbdkit.sock"
kill "${PIDS[-1]}" && wait "${PIDS[-1]}" 2>/dev/null || true

# ---- memfabric: nbd::Export -------------------------------------------------------------
"$NBD_BENCH_SERVER" "$WORK/mf.sock" "$SIZE" "$BACKEND" mem >"$WORK/mf.log" 2>&1 &
PIDS+=($!)
wait_socket "$WORK/mf.sock"
run_side memfabric "nbd+unix:///mem?socket=$WORK/mf.sock"

# ---- the table -----------------------------------------------------------------------
echo "peer: $(nbdkit --version | head -1) memory; memfabric: nbd_bench_server ($BACKEND backend);" \
  "client: $(fio --version) nbd engine; unix sockets; $SIZE; ${ROW_SECONDS}s per row"
python3 - "$WORK" "$DEPTH" "$SEQ_DEPTH" <<'PY'
import json, os, sys

work, depth, seq_depth = sys.argv[1], sys.argv[2], sys.argv[3]

def row(side, name):
    job = json.load(open(os.path.join(work, f"{side}-{name}.json")))["jobs"][0]
    rw = job["job options"]["rw"]
    data = job["write"] if "write" in rw else job["read"]
    pct = data["lat_ns"].get("percentile", {})
    return {"iops": data["iops"], "mbs": data["bw_bytes"] / 1e6,
            "p50": pct.get("50.000000", 0) / 1000.0, "p99": pct.get("99.000000", 0) / 1000.0}

names = [f"randread-4K-1", f"randread-4K-{depth}", f"randwrite-4K-1", f"randwrite-4K-{depth}",
         f"read-1M-{seq_depth}", f"write-1M-{seq_depth}"]
fmt = "{:<24} {:>10} {:>10} {:>6}   {:>9} {:>9} {:>6}   {:>9} {:>9}"
head = fmt.format("row", "nbdkit", "memfabric", "ratio", "p50us nbd", "p50us mf", "ratio", "p99us nbd", "p99us mf")
print(head)
print("-" * len(head))
def ratio(a, b): return f"{a / b:.2f}" if b else "-"
for name in names:
    p, m = row("nbdkit", name), row("memfabric", name)
    seq = name.startswith(("read-", "write-"))
    key, unit = ("mbs", "MB/s") if seq else ("iops", "IOPS")
    pattern, block, qd = name.split("-")
    print(fmt.format(f"{pattern} {block} QD{qd} {unit}", f"{p[key]:.0f}", f"{m[key]:.0f}", ratio(m[key], p[key]),
                     f"{p['p50']:.1f}", f"{m['p50']:.1f}", ratio(m["p50"], p["p50"]), f"{p['p99']:.1f}",
                     f"{m['p99']:.1f}"))
print("ratio = memfabric / nbdkit: above 1 is better for memfabric in throughput, below 1 in latency")
PY
