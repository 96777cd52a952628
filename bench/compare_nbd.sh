#!/usr/bin/env bash
# NBD server comparison on one host, peer and memfabric in the same run, same client:
#   peer:      nbdkit's memory plugin (sparse RAM) on a unix socket
#   memfabric: nbd::Export (nbd/export.h) over an in-process memory region, served by
#              nbd_bench_server on a unix socket
# Both are driven by fio's nbd engine (libnbd) with the same jobs:
#   4 KiB randread QD1 and QD16, 4 KiB randwrite QD1 and QD16, 1 MiB sequential read and
#   write (QD SEQ_DEPTH). Before the rows each side gets a 1 MiB sequential write over the
#   whole size, so both read real (allocated) memory.
# The rows run ROUNDS times, the two servers taking turns (which one goes first alternates
# by round), so that a noisy moment on the host hits both. With two CPUs or more, fio runs
# on CPU 0 and both servers on the others (PIN=0 turns this off): unpinned, fio and a busy
# server thread were often seen sharing one CPU for a while, and one row's rounds spread
# from 0.7x to 1.3x for either server. The table prints the median of
# the rounds: IOPS (MB/s for the 1 MiB rows), p50/p99 latency, the ratio memfabric/nbdkit
# of the medians, the lowest and highest per-round ratio, and fio's own CPU use. fio drives
# a job from one thread: where that thread is near 100% busy (the 4 KiB QD16 rows on two
# CPUs), the row is bound by the client and shows little of the server's own speed.
#
# Usage: bench/compare_nbd.sh
# Environment: ROUNDS (default 5), ROW_SECONDS (default 3), SIZE (default 1G), DEPTH (16),
#   SEQ_DEPTH (4), BACKEND=region|memory|tcp (nbd_bench_server's backend, default region),
#   PIN (1: fio on CPU 0, the servers on the other CPUs; 0: wherever the scheduler puts them),
#   NBD_BENCH_SERVER=path to a built nbd_bench_server (else the release preset is built).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-5}
ROW_SECONDS=${ROW_SECONDS:-3}
SIZE=${SIZE:-1G}
DEPTH=${DEPTH:-16}
SEQ_DEPTH=${SEQ_DEPTH:-4}
BACKEND=${BACKEND:-region}
CPUS=$(nproc)
PIN=${PIN:-$((CPUS >= 2 ? 1 : 0))}
SERVER_WAIT_TRIES=100  # x 0.1 s
export PATH=/usr/bin:/bin:$PATH  # the system python3 for the table (and libnbd tools)

die() { echo "compare_nbd: $*" >&2; exit 1; }
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup (as root) to install the peers"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (Debian's fio has it)"
[[ $PIN == 0 || $PIN == 1 ]] || die "PIN is 0 or 1, not '$PIN'"
CLIENT_ON=() SERVER_ON=() PLACEMENT="unpinned"
if [[ $PIN == 1 ]]; then
  ((CPUS >= 2)) || die "PIN=1 needs two CPUs or more (this machine has $CPUS)"
  command -v taskset >/dev/null || die "taskset (util-linux) is missing"
  CLIENT_ON=(taskset -c 0) SERVER_ON=(taskset -c "1-$((CPUS - 1))")
  PLACEMENT="fio on CPU 0, servers on CPU 1-$((CPUS - 1))"
fi

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

# fio_row SIDE URI NAME RW BLOCK DEPTH [extra fio args]: one job, JSON into $WORK/SIDE-NAME.json
fio_row() {
  local side=$1 uri=$2 name=$3 rw=$4 bs=$5 qd=$6
  shift 6
  echo "== $side: $rw $bs QD$qd ($name)" >&2
  "${CLIENT_ON[@]}" fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" \
    --lat_percentiles=1 --output-format=json --output="$WORK/$side-$name.json" "$@" >/dev/null ||
    die "fio $rw on $side failed"
}

# run_rows SIDE URI ROUND: the six rows of one round
run_rows() {
  local side=$1 uri=$2 round=$3
  local timed=(--time_based --runtime="$ROW_SECONDS")
  fio_row "$side" "$uri" "randread-4K-1-r$round" randread 4k 1 "${timed[@]}"
  fio_row "$side" "$uri" "randread-4K-$DEPTH-r$round" randread 4k "$DEPTH" "${timed[@]}"
  fio_row "$side" "$uri" "randwrite-4K-1-r$round" randwrite 4k 1 "${timed[@]}"
  fio_row "$side" "$uri" "randwrite-4K-$DEPTH-r$round" randwrite 4k "$DEPTH" "${timed[@]}"
  fio_row "$side" "$uri" "read-1M-$SEQ_DEPTH-r$round" read 1M "$SEQ_DEPTH" "${timed[@]}"
  fio_row "$side" "$uri" "write-1M-$SEQ_DEPTH-r$round" write 1M "$SEQ_DEPTH" "${timed[@]}"
}

# ---- both servers, filled once ---------------------------------------------------------
"${SERVER_ON[@]}" nbdkit --foreground --exit-with-parent --unix "$WORK/nbdkit.sock" memory "$SIZE" &
PIDS+=($!)
"${SERVER_ON[@]}" "$NBD_BENCH_SERVER" "$WORK/mf.sock" "$SIZE" "$BACKEND" mem >"$WORK/mf.log" 2>&1 &
PIDS+=($!)
wait_socket "$WORK/nbdkit.sock"
wait_socket "$WORK/mf.sock"
declare -A URI=([nbdkit]="nbd+unix:///?socket=$WORK/nbdkit.sock" [memfabric]="nbd+unix:///mem?socket=$WORK/mf.sock")
for side in nbdkit memfabric; do
  fio_row "$side" "${URI[$side]}" fill write 1M "$SEQ_DEPTH"  # allocates every page once, untimed
done

# ---- the rounds ------------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
  echo "== round $round of $ROUNDS" >&2
  order=(nbdkit memfabric)
  ((round % 2 == 0)) && order=(memfabric nbdkit)
  for side in "${order[@]}"; do run_rows "$side" "${URI[$side]}" "$round"; done
done

# ---- the table -----------------------------------------------------------------------
echo "peer: $(nbdkit --version | head -1) memory; memfabric: nbd_bench_server ($BACKEND backend);" \
  "client: $(fio --version) nbd engine; unix sockets; $PLACEMENT; $SIZE; ${ROW_SECONDS}s per row;" \
  "median of $ROUNDS rounds"
python3 - "$WORK" "$DEPTH" "$SEQ_DEPTH" "$ROUNDS" <<'PY'
import json, os, statistics, sys

work, depth, seq_depth, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def one(side, name):
    job = json.load(open(os.path.join(work, f"{side}-{name}.json")))["jobs"][0]
    rw = job["job options"]["rw"]
    data = job["write"] if "write" in rw else job["read"]
    pct = data["lat_ns"].get("percentile", {})
    return {"iops": data["iops"], "mbs": data["bw_bytes"] / 1e6,
            "p50": pct.get("50.000000", 0) / 1000.0, "p99": pct.get("99.000000", 0) / 1000.0,
            "cpu": job["usr_cpu"] + job["sys_cpu"]}

def row(side, name):  # the median of the rounds, per figure, and the per-round figures
    runs = [one(side, f"{name}-r{r}") for r in range(1, rounds + 1)]
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}, runs

names = [f"randread-4K-1", f"randread-4K-{depth}", f"randwrite-4K-1", f"randwrite-4K-{depth}",
         f"read-1M-{seq_depth}", f"write-1M-{seq_depth}"]
fmt = "{:<24} {:>10} {:>10} {:>6} {:>11}   {:>9} {:>9} {:>6}   {:>9} {:>9}   {:>7} {:>6}"
head = fmt.format("row", "nbdkit", "memfabric", "ratio", "round range", "p50us nbd", "p50us mf", "ratio",
                  "p99us nbd", "p99us mf", "fio%nbd", "fio%mf")
print(head)
print("-" * len(head))
def ratio(a, b): return f"{a / b:.2f}" if b else "-"
for name in names:
    (p, p_runs), (m, m_runs) = row("nbdkit", name), row("memfabric", name)
    seq = name.startswith(("read-", "write-"))
    key, unit = ("mbs", "MB/s") if seq else ("iops", "IOPS")
    per_round = [a[key] / b[key] for a, b in zip(m_runs, p_runs) if b[key]]
    spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
    pattern, block, qd = name.split("-")
    print(fmt.format(f"{pattern} {block} QD{qd} {unit}", f"{p[key]:.0f}", f"{m[key]:.0f}", ratio(m[key], p[key]),
                     spread,
                     f"{p['p50']:.1f}", f"{m['p50']:.1f}", ratio(m["p50"], p["p50"]), f"{p['p99']:.1f}",
                     f"{m['p99']:.1f}", f"{p['cpu']:.0f}", f"{m['cpu']:.0f}"))
print("ratio = memfabric / nbdkit of the medians: above 1 is better for memfabric in throughput, below 1 in"
      " latency; round range = the lowest and highest ratio of one round; fio% = the CPU use of the client"
      " (one thread, user + system): near 100 the row measures the client more than the server")
PY
