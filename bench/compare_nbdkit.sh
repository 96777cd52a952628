#!/usr/bin/env bash
# End-to-end comparison on loopback, peer first, same run:
#   peer:      nbdkit's memory plugin (sparse RAM), driven by fio's nbd engine (libnbd)
#   memfabric: `memfabric serve` (anonymous RAM, TCP transport), driven by `memfabric bench`
# Rows (same order on both sides; the first one also fills the memory):
#   1 MiB sequential write QD4, 4 KiB randread QD1 and QD16, 1 MiB sequential read QD4,
#   4 KiB randwrite QD1 and QD16.
# Prints each side's IOPS, MB/s and latency percentiles, and the ratio memfabric/nbdkit.
#
# Usage: bench/compare_nbdkit.sh            (builds the release preset when needed)
# fio's nbd engine uses one connection; memfabric bench uses CONNECTIONS (1) for the 4 KiB
# rows and SEQ_CONNECTIONS (2) for the 1 MiB rows (nbdkit runs a connection's requests on
# several threads, a memfabric server worker runs one connection's requests).
# Environment: ROW_SECONDS (default 3), REGION_SIZE (1G), DEPTH (16), SEQ_DEPTH (4),
#   CONNECTIONS (1), SEQ_CONNECTIONS (2),
#   NBD_SOCKET=unix|tcp (default unix, as in VM.md's reference figures),
#   MEMFABRIC=path to a memfabric binary (skips the build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROW_SECONDS=${ROW_SECONDS:-3}
REGION_SIZE=${REGION_SIZE:-1G}
DEPTH=${DEPTH:-16}
SEQ_DEPTH=${SEQ_DEPTH:-4}
CONNECTIONS=${CONNECTIONS:-1}
SEQ_CONNECTIONS=${SEQ_CONNECTIONS:-2}
NBD_SOCKET=${NBD_SOCKET:-unix}
SERVER_WAIT_TRIES=100  # x 0.1 s

die() { echo "compare_nbdkit: $*" >&2; exit 1; }
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup (as root) to install the peers"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (Debian's fio has it)"

if [[ -z "${MEMFABRIC:-}" ]]; then
  MEMFABRIC="$ROOT/build/release/tools/memfabric"
  echo "== building the release preset (memfabric)" >&2
  (cd "$ROOT" && { [[ -f build/release/build.ninja ]] || cmake --preset release >/dev/null; } &&
    cmake --build --preset release --target memfabric >/dev/null) || die "release build failed"
fi
[[ -x "$MEMFABRIC" ]] || die "no memfabric binary at $MEMFABRIC"

WORK=$(mktemp -d /tmp/mf-compare.XXXXXX)
NBDKIT_PID=""
SERVE_PID=""
cleanup() {
  local pid
  for pid in "$NBDKIT_PID" "$SERVE_PID"; do
    if [[ -n "$pid" ]]; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- the peer: nbdkit memory + fio ---------------------------------------------------
if [[ "$NBD_SOCKET" == unix ]]; then
  nbdkit --foreground --exit-with-parent --unix "$WORK/nbd.sock" memory "$REGION_SIZE" &
  NBDKIT_PID=$!
  NBD_URI="nbd+unix:///?socket=$WORK/nbd.sock"
  for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do [[ -S "$WORK/nbd.sock" ]] && break; sleep 0.1; done
else
  NBD_PORT=$(free_port)
  nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$NBD_PORT" memory "$REGION_SIZE" &
  NBDKIT_PID=$!
  NBD_URI="nbd://127.0.0.1:$NBD_PORT/"
  sleep 0.5
fi
kill -0 "$NBDKIT_PID" 2>/dev/null || die "nbdkit did not start"

# run_fio NAME RW BLOCK DEPTH: one time-bound fio job, JSON into $WORK/fio-NAME.json
run_fio() {
  echo "== nbdkit: $2 $3 QD$4 (${ROW_SECONDS}s)" >&2
  fio --name="$1" --ioengine=nbd --uri="$NBD_URI" --rw="$2" --bs="$3" --iodepth="$4" \
    --size="$REGION_SIZE" --time_based --runtime="$ROW_SECONDS" --lat_percentiles=1 \
    --output-format=json --output="$WORK/fio-$1.json" >/dev/null || die "fio $2 failed"
}
run_fio "write-1M-$SEQ_DEPTH" write 1M "$SEQ_DEPTH"
run_fio randread-4K-1 randread 4k 1
run_fio "randread-4K-$DEPTH" randread 4k "$DEPTH"
run_fio "read-1M-$SEQ_DEPTH" read 1M "$SEQ_DEPTH"
run_fio randwrite-4K-1 randwrite 4k 1
run_fio "randwrite-4K-$DEPTH" randwrite 4k "$DEPTH"
kill "$NBDKIT_PID" 2>/dev/null || true
wait "$NBDKIT_PID" 2>/dev/null || true
NBDKIT_PID=""

# ---- memfabric -----------------------------------------------------------------------
"$MEMFABRIC" serve --listen 127.0.0.1:0 --port-file "$WORK/port" --region "bench=$REGION_SIZE" --insecure \
  --log-level warn &
SERVE_PID=$!
for ((i = 0; i < SERVER_WAIT_TRIES; i++)); do [[ -s "$WORK/port" ]] && break; sleep 0.1; done
[[ -s "$WORK/port" ]] || die "memfabric serve did not start"
PORT=$(cat "$WORK/port")
echo "== memfabric: bench on tcp://127.0.0.1:$PORT/bench (${ROW_SECONDS}s per row)" >&2
"$MEMFABRIC" bench "tcp://127.0.0.1:$PORT/bench" --insecure --quiet --json --seconds "$ROW_SECONDS" \
  --pattern write,randread,read,randwrite --block 4K --depth "$DEPTH" --seq-block 1M --seq-depth "$SEQ_DEPTH" \
  --connections "$CONNECTIONS" --seq-connections "$SEQ_CONNECTIONS" \
  >"$WORK/memfabric.json" || die "memfabric bench failed"

# ---- the table -----------------------------------------------------------------------
echo "peers: $(nbdkit --version | head -1), $(fio --version); memfabric: $("$MEMFABRIC" --version)"
python3 - "$WORK" "$NBD_SOCKET" <<'PY'
import glob, json, os, sys

work, nbd_socket = sys.argv[1], sys.argv[2]
mf = json.load(open(os.path.join(work, "memfabric.json")))

def fio_row(path):
    job = json.load(open(path))["jobs"][0]
    opts = job["job options"]
    side = job["write"] if "write" in opts["rw"] else job["read"]
    pct = side["lat_ns"].get("percentile", {})
    def us(key): return pct.get(key, 0) / 1000.0
    return {"iops": side["iops"], "bytes_per_sec": side["bw_bytes"],
            "p50": us("50.000000"), "p99": us("99.000000"), "p999": us("99.900000")}

peer = {}
for path in glob.glob(os.path.join(work, "fio-*.json")):
    pattern, block, depth = os.path.basename(path)[4:-5].split("-")
    peer[(pattern, block, int(depth))] = fio_row(path)

def block_name(b): return f"{b >> 20}M" if b >= 1 << 20 else f"{b >> 10}K"

print(f"memfabric ({mf['transport']}, memfabric bench) vs nbdkit memory ({nbd_socket} socket, fio nbd engine), "
      f"loopback, {mf['seconds_per_row']:g} s per row")
cols = ("row", "nbdkit", "memfabric", "ratio", "p50 us nbd", "p50 us mf", "ratio", "p99 us nbd", "p99 us mf")
fmt = "{:<22} {:>9} {:>9} {:>6}   {:>10} {:>10} {:>6}   {:>10} {:>10}"
print(fmt.format(*cols))
print("-" * len(fmt.format(*cols)))
def ratio(a, b): return f"{a / b:.2f}" if b else "-"
for r in mf["rows"]:
    key = (r["pattern"], block_name(r["block"]), r["depth"])
    if key not in peer:
        continue
    p = peer[key]
    seq = r["pattern"] in ("read", "write")
    unit = "MB/s" if seq else "IOPS"
    ours = r["bytes_per_sec"] / 1e6 if seq else r["iops"]
    theirs = p["bytes_per_sec"] / 1e6 if seq else p["iops"]
    lat = r["lat_us"]
    print(fmt.format(f"{r['pattern']} {key[1]} QD{r['depth']} {unit}", f"{theirs:.0f}", f"{ours:.0f}",
                     ratio(ours, theirs), f"{p['p50']:.1f}", f"{lat['p50']:.1f}", ratio(lat["p50"], p["p50"]),
                     f"{p['p99']:.1f}", f"{lat['p99']:.1f}"))
print("ratio = memfabric / nbdkit: above 1 is better for memfabric in throughput, below 1 in latency")
PY
