#!/usr/bin/env bash
# The kernel's NBD client: /dev/nbd0 exists; nbd-client (netlink) attaches it to an
# `nbdkit memory` server on a unix socket; a random pattern written with O_DIRECT reads back
# after the page cache is dropped, and the server holds it (read back with nbdcopy after
# the device is disconnected).
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm
readonly SOCK=/tmp/nbd-kernel.sock DEV=/dev/nbd0 MIB=8

[[ -b $DEV ]] || fail "$DEV does not exist (is the nbd module loaded?)"

note "nbdkit memory 64M on $SOCK"
spawn nbdkit -f -U "$SOCK" memory 64M
wait_path -S "$SOCK"

note "nbd-client $SOCK $DEV"
nbd-client -unix "$SOCK" "$DEV" -b 4096 || fail "nbd-client could not attach $DEV"
trap 'nbd-client -d "$DEV" >/dev/null 2>&1; _kill_spawned' EXIT
nbd-client -c "$DEV" >/dev/null || fail "nbd-client -c: $DEV is not connected"
size=$(blockdev --getsize64 "$DEV")
((size == 64 << 20)) || fail "$DEV has $size bytes, not 64 MiB"

note "write ${MIB} MiB of random data at offset 1 MiB, read it back"
head -c $((MIB << 20)) /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of="$DEV" bs=1M seek=1 oflag=direct conv=fsync status=none ||
  fail "writing $DEV"
echo 3 >/proc/sys/vm/drop_caches
dd if="$DEV" of=/tmp/readback bs=1M skip=1 count="$MIB" iflag=direct status=none ||
  fail "reading $DEV"
cmp /tmp/pattern /tmp/readback || fail "the pattern read back from $DEV differs"

note "disconnect, then read the server's copy with nbdcopy"
nbd-client -d "$DEV" || fail "nbd-client -d $DEV"
nbdcopy "nbd+unix:///?socket=$SOCK" /tmp/server.img || fail "nbdcopy from the server"
cmp -i $((1 << 20)):0 -n $((MIB << 20)) /tmp/server.img /tmp/pattern ||
  fail "the server does not hold the pattern"
echo "PASS: kernel NBD client round trip through /dev/nbd0"
