#!/usr/bin/env bash
# Migration downtime vs its physical minimum (issue 7): builds migration_bench (release
# preset) and runs it. One in-process server over TCP loopback (or behind a delaying proxy,
# RTT_MS); per fraction of FRACTIONS, a fresh source (MountSource) and destination (Leecher)
# migrate the region after that fraction of its chunks was written post-pre-copy. Prints
# the downtime and its parts, the dirty bytes, the minimum (dirty/write_bw + dirty/read_bw,
# the link measured in the same run) and the ratio; checks destination == source bytes.
#
# Usage: bench/compare_migration.sh [extra migration_bench flags]
# Environment: SIZE (1G), FRACTIONS (1,10,50 percent), CHUNK (64K), RTT_MS (0),
#   PUSH_INTERVAL_MS (0), BUILD_DIR (build/release, configured with the release preset
#   when missing), JOBS (build parallelism, nproc),
#   MIGRATION_BENCH=path to a built migration_bench (skips the build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${SIZE:-1G}
FRACTIONS=${FRACTIONS:-1,10,50}
CHUNK=${CHUNK:-64K}
RTT_MS=${RTT_MS:-0}
PUSH_INTERVAL_MS=${PUSH_INTERVAL_MS:-0}
BUILD_DIR=${BUILD_DIR:-build/release}
JOBS=${JOBS:-$(nproc)}

die() { echo "compare_migration: $*" >&2; exit 1; }

if [[ -z "${MIGRATION_BENCH:-}" ]]; then
  MIGRATION_BENCH="$ROOT/$BUILD_DIR/bench/migration_bench"
  echo "== building migration_bench in $BUILD_DIR" >&2
  (cd "$ROOT" && { [[ -f "$BUILD_DIR/build.ninja" ]] || cmake --preset release -B "$BUILD_DIR" >/dev/null; } &&
    cmake --build "$BUILD_DIR" -j "$JOBS" --target migration_bench >/dev/null) || die "release build failed"
fi
[[ -x "$MIGRATION_BENCH" ]] || die "no migration_bench at $MIGRATION_BENCH"

echo "host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(uname -r)"
"$MIGRATION_BENCH" --size "$SIZE" --fractions "$FRACTIONS" --chunk "$CHUNK" --rtt-ms "$RTT_MS" \
  --push-interval-ms "$PUSH_INTERVAL_MS" "$@"
