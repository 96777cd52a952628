#!/usr/bin/env bash
# Managed mount vs direct reads under added latency (issue 7; the r3map thesis experiment):
# builds mount_bench (release preset) and runs it. One in-process server over TCP loopback,
# a delaying proxy in front of it for each RTT, and per RTT: direct sequential reads at QD1
# and QD$DEPTH, then fabric::Mount (background pull, WaitAllLocal, Mount::Read of
# everything) for each CHUNK:BACKGROUND_DEPTH of $MOUNTS. Prints MB/s, the ratio
# mount/direct, memcpy baselines and the proxy's own cost at 0 ms.
#
# Usage: bench/compare_mount.sh [extra mount_bench flags, e.g. --verbose]
# Environment: SIZE (256M), RTTS (0,1,5,20 ms), MOUNTS (64K:default,64K:8,1M:4,1M:64), DEPTH (4),
#   BLOCK (1M), CONNECTIONS (4), BUILD_DIR (build/release, configured with the release preset
#   when missing), JOBS (build parallelism, nproc),
#   MOUNT_BENCH=path to a built mount_bench (skips the build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${SIZE:-256M}
RTTS=${RTTS:-0,1,5,20}
MOUNTS=${MOUNTS:-64K:default,64K:8,1M:4,1M:64}
DEPTH=${DEPTH:-4}
BLOCK=${BLOCK:-1M}
CONNECTIONS=${CONNECTIONS:-4}
BUILD_DIR=${BUILD_DIR:-build/release}
JOBS=${JOBS:-$(nproc)}

die() { echo "compare_mount: $*" >&2; exit 1; }

if [[ -z "${MOUNT_BENCH:-}" ]]; then
  MOUNT_BENCH="$ROOT/$BUILD_DIR/bench/mount_bench"
  echo "== building mount_bench in $BUILD_DIR" >&2
  (cd "$ROOT" && { [[ -f "$BUILD_DIR/build.ninja" ]] || cmake --preset release -B "$BUILD_DIR" >/dev/null; } &&
    cmake --build "$BUILD_DIR" -j "$JOBS" --target mount_bench >/dev/null) || die "release build failed"
fi
[[ -x "$MOUNT_BENCH" ]] || die "no mount_bench at $MOUNT_BENCH"

echo "host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(uname -r)"
"$MOUNT_BENCH" --size "$SIZE" --rtts "$RTTS" --mounts "$MOUNTS" --depth "$DEPTH" --block "$BLOCK" \
  --connections "$CONNECTIONS" "$@"
