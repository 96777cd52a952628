#!/usr/bin/env bash
# RDMA benchmark, in the test VM (one boot, soft-RoCE rxe0): perftest (ib_read_lat,
# ib_read_bw, ib_write_bw over rdma_cm, 4 KiB and 64 KiB) first, then memfabric's RDMA
# transport on the same sizes, then memfabric over TCP in the same guest; prints each
# ratio (bench/vm/rdma_vs_perftest.sh). Goals (issue 4): bandwidth >= 0.9x perftest,
# 4 KiB read latency <= 1.2x perftest.
#
# Usage: bench/compare_perftest.sh   (builds the release preset when needed; as root)
# Environment: ROW_SECONDS (3), PERFTEST_ITERS (5000), MEMFABRIC (skip the build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${MEMFABRIC:-}" ]]; then
  MEMFABRIC="$ROOT/build/release/tools/memfabric"
  echo "== building the release preset (memfabric)" >&2
  (cd "$ROOT" && { [[ -f build/release/build.ninja ]] || cmake --preset release >/dev/null; } &&
    cmake --build --preset release --target memfabric >/dev/null) || { echo "release build failed" >&2; exit 1; }
fi
export MEMFABRIC ROW_SECONDS PERFTEST_ITERS
exec "$ROOT/tests/vm/run-in-vm" --timeout 900 -- "$ROOT/bench/vm/rdma_vs_perftest.sh"
