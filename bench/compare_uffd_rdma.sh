#!/usr/bin/env bash
# uffd Mapping over RDMA vs over TCP, in the test VM (one boot, soft-RoCE rxe0): the
# first-touch scan of bench/uffd_bench.cc (raw local userfaultfd handler, then the Mapping
# without and with prefetch) over rdma:// and tcp:// against the same in-process server,
# then the rdma/tcp ratios (issue 5).
#
# Usage: bench/compare_uffd_rdma.sh   (builds the release preset when needed; as root)
# Environment: SIZE (default 64M: the guest is small and emulated), CHUNKS (4K,64K,2M),
#   UFFD_BENCH (skip the build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${UFFD_BENCH:-}" ]]; then
  UFFD_BENCH="$ROOT/build/release/bench/uffd_bench"
  echo "== building the release preset (uffd_bench)" >&2
  (cd "$ROOT" && { [[ -f build/release/build.ninja ]] || cmake --preset release >/dev/null; } &&
    cmake --build --preset release --target uffd_bench >/dev/null) || { echo "release build failed" >&2; exit 1; }
fi
# In the guest, MF_VM_ADDR is the address rxe0 sits on.
exec "$ROOT/tests/vm/run-in-vm" --timeout 900 -- /bin/sh -c \
  "exec \"$UFFD_BENCH\" --host \"\$MF_VM_ADDR\" --schemes tcp,rdma --size ${SIZE:-64M} --chunks ${CHUNKS:-4K,64K,2M}"
