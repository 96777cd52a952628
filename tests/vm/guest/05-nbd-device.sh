#!/usr/bin/env bash
# memfabric's kernel block device end to end, in the VM: `memfabric serve` on $MF_VM_ADDR,
# then through `memfabric mount --nbd` / `memfabric swap` (nbd::Device over netlink):
#   1. mmap /dev/nbdX, write a pattern, and find it on the server with `memfabric read`;
#   2. mkfs.ext4 + mount + files; SIGINT while mounted is refused (the device stays attached
#      and served); umount, detach, re-attach on the same device, remount and read the files
#      back;
#   3. a `mount --nbd` killed with SIGKILL leaves its device behind: a new attach names it
#      and refuses, --reclaim takes it back;
#   3b. SIGINT to `memfabric swap` while it attaches: it detaches and exits 130, and mkswap
#      never wrote the region;
#   4. `memfabric swap`, then a process that allocates more than the guest's free memory
#      (most of it is taken away as huge pages first) so that pages go to the remote swap;
#      its memory reads back intact and /proc/swaps showed the swap in use;
#   4b. swapoff refused by the kernel (strict overcommit): the swap stays on and served, and
#      a second SIGTERM then detaches;
#   5. after every detach (SIGINT, or SIGTERM for the reclaimed device and the swap) the
#      device is free (/sys/block/nbdX/pid gone, size 0).
#
#   05-nbd-device.sh MEMFABRIC_BINARY [SCHEME [--no-swap]]
# SCHEME (default: $MF_NBD_SCHEME, else tcp) is the URL's scheme: the data plane (e.g. rdma).
# --no-swap stops after step 3b: the swap round trip costs minutes of emulated CPU, and the
# CI suite runs it once (over TCP); over rdma:// it passes the same way when run by hand.
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm

readonly MF=${1:?usage: $0 MEMFABRIC_BINARY [SCHEME [--no-swap]]} SCHEME=${2:-${MF_NBD_SCHEME:-tcp}}
readonly NO_SWAP=${3:-}
[[ -z $NO_SWAP || $NO_SWAP == --no-swap ]] || fail "unknown option '$NO_SWAP'"
readonly DIR=${MF_VM_TEST_SCRATCH:-/tmp}/nbd-device PY=/usr/bin/python3
readonly SWAP_MIB=384 OVERFLOW_MIB=128 LEFT_FREE_MIB=320
mkdir -p "$DIR" "$DIR/mnt"
MEMFABRIC_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export MEMFABRIC_SECRET

# device_free DEV: the kernel holds no configuration for DEV any more.
device_free() {
  local sys=/sys/block/${1#/dev/}
  [[ ! -e $sys/pid ]] || fail "$1 still has an owner (pid $(cat "$sys/pid"))"
  [[ $(cat "$sys/size") == 0 ]] || fail "$1 still has $(cat "$sys/size") sectors"
}

# attach OUT ARGS...: `memfabric mount --nbd ARGS...` in the background, its pid in $attached_pid;
# waits for the device path it prints into OUT.
attach() {
  local out=$1
  shift
  : >"$out"
  "$MF" mount --nbd "$@" >"$out" 2>"$out.log" &
  attached_pid=$!
  _spawned+=("$attached_pid")
  local deadline=$((SECONDS + 60))
  until [[ -s $out ]]; do
    kill -0 "$attached_pid" 2>/dev/null || { cat "$out.log" >&2; fail "mount --nbd $* exited"; }
    ((SECONDS < deadline)) || fail "mount --nbd $* printed no device in 60s"
    sleep 0.1
  done
}

# detach PID DEV [SIGNAL]: SIGINT (or SIGNAL) to a `mount --nbd`/`swap`, which must exit 0
# and free DEV.
detach() {
  local sig=${3:-INT}
  kill "-$sig" "$1"
  local rc=0
  wait "$1" || rc=$?
  ((rc == 0)) || fail "memfabric ($1) exited with $rc on SIG$sig while detaching $2"
  device_free "$2"
}

# Huge pages for the swap region (never swapped itself); more are taken in step 4.
echo $((SWAP_MIB / 2)) >/proc/sys/vm/nr_hugepages
# The server must not be swapped onto the device it serves: no swap for its cgroup.
if mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || [[ -e /sys/fs/cgroup/cgroup.procs ]]; then
  echo +memory >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
  mkdir -p /sys/fs/cgroup/mf-server
  echo 0 >/sys/fs/cgroup/mf-server/memory.swap.max 2>/dev/null || note "no memory.swap.max"
  echo $$ >/sys/fs/cgroup/mf-server/cgroup.procs
fi

note "memfabric serve on $MF_VM_ADDR (regions disk=64M, swap=${SWAP_MIB}M hugetlb)"
serve_rdma=()
rm -f "$DIR/port"  # one a previous run left behind would name a dead server
[[ $SCHEME == rdma || $SCHEME == auto ]] && serve_rdma=(--rdma on)
spawn "$MF" serve --listen "$MF_VM_ADDR:0" --port-file "$DIR/port" --region disk=64M \
  --region "swap=${SWAP_MIB}M,backing=hugetlb" --log-level warn "${serve_rdma[@]}"
server_pid=${_spawned[-1]}
wait_path -s "$DIR/port" 60
[[ -e /sys/fs/cgroup/mf-server/cgroup.procs ]] && echo $$ >/sys/fs/cgroup/cgroup.procs
URL=$SCHEME://$MF_VM_ADDR:$(cat "$DIR/port")
readonly URL
echo "server: $URL"

# ---- 1. mmap ----------------------------------------------------------------------------------
note "1. mount --nbd $URL/disk --writable; a pattern through mmap, read back from the server"
attach "$DIR/dev" "$URL/disk" --writable --log-level info
DEV=$(cat "$DIR/dev")
[[ -b $DEV ]] || fail "mount --nbd printed '$DEV', not a block device"
[[ $(blockdev --getsize64 "$DEV") == $((64 << 20)) ]] || fail "$DEV is not 64 MiB"
grep -q "^memfabric pid=$attached_pid " "/sys/block/${DEV#/dev/}/backend" ||
  fail "unexpected backend: $(cat "/sys/block/${DEV#/dev/}/backend")"
head -c $((4 << 20)) /dev/urandom >"$DIR/pattern"
"$PY" - "$DEV" "$DIR/pattern" <<'EOF' || fail "mmap of $DEV"
import mmap, os, sys
dev, pattern = sys.argv[1], open(sys.argv[2], "rb").read()
fd = os.open(dev, os.O_RDWR)
m = mmap.mmap(fd, 8 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[1 << 20:(1 << 20) + len(pattern)] = pattern
m.flush()
assert m[1 << 20:(1 << 20) + len(pattern)] == pattern
m.close()
os.close(fd)
EOF
"$MF" read "$URL/disk" 1M 4M --force >"$DIR/readback" || fail "memfabric read"
cmp "$DIR/pattern" "$DIR/readback" || fail "the server does not hold what was written through mmap"
echo "pattern written through mmap of $DEV is on the server"

# ---- 2. file system ---------------------------------------------------------------------------
note "2. mkfs.ext4 + mount + files; detach; re-attach on $DEV and read them back"
mkfs.ext4 -q -F -E nodiscard "$DEV" || fail "mkfs.ext4 $DEV"
mount "$DEV" "$DIR/mnt" || fail "mount $DEV"
cp "$DIR/pattern" "$DIR/mnt/pattern"
for i in $(seq 1 20); do head -c $((i * 3000)) /dev/urandom >"$DIR/mnt/file$i"; done
mkdir "$DIR/mnt/sub" && echo hello >"$DIR/mnt/sub/hello"
(cd "$DIR/mnt" && find . -type f -exec sha256sum {} + >"$DIR/sums")
# SIGINT while mounted: no detach (the file system would lose its unwritten data); the
# device stays attached and served, and the message names the mount.
kill -INT "$attached_pid"
deadline=$((SECONDS + 30))
until grep -q "not detaching $DEV: it is in use (mounted at " "$DIR/dev.log"; do
  kill -0 "$attached_pid" 2>/dev/null || { cat "$DIR/dev.log" >&2; fail "mount --nbd exited on SIGINT with $DEV mounted"; }
  ((SECONDS < deadline)) || fail "mount --nbd did not refuse to detach the mounted $DEV in 30s"
  sleep 0.2
done
grep "not detaching" "$DIR/dev.log"
[[ -e /sys/block/${DEV#/dev/}/pid ]] || fail "$DEV was disconnected while mounted"
sync -f "$DIR/mnt/pattern" || fail "sync on $DEV after the refused detach"
echo 3 >/proc/sys/vm/drop_caches
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/sums") || fail "files differ after the refused detach"
umount "$DIR/mnt" || fail "umount $DEV"
detach "$attached_pid" "$DEV"
# The re-attach puts the device on a managed mount (--cache): reads come from the local
# copy the background pull fills, writes are pushed back on the interval and at detach.
attach "$DIR/dev2" "$URL/disk" "$DEV" --writable --cache --push-interval 500ms
[[ $(cat "$DIR/dev2") == "$DEV" ]] || fail "asked for $DEV, got $(cat "$DIR/dev2")"
mount "$DEV" "$DIR/mnt" || fail "remount $DEV"
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/sums") || fail "files differ after re-attach (--cache)"
head -c 300000 /dev/urandom >"$DIR/mnt/cached"
(cd "$DIR/mnt" && sha256sum cached >>"$DIR/sums")
umount "$DIR/mnt"
fsck.ext4 -n "$DEV" >/dev/null || fail "fsck.ext4 found errors"
detach "$attached_pid" "$DEV"
grep -q "cache: pushed" "$DIR/dev2.log" || fail "mount --nbd --cache did not report its final push"
# A plain attach reads what the cached one pushed.
attach "$DIR/dev2b" "$URL/disk" "$DEV"
mount -o ro "$DEV" "$DIR/mnt" || fail "mount $DEV read-only"
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/sums") || fail "files written through --cache are not on the server"
umount "$DIR/mnt"
detach "$attached_pid" "$DEV"
echo "$(wc -l <"$DIR/sums") files read back after detach and re-attach, through a managed mount and without"

# ---- 3. reclaim -------------------------------------------------------------------------------
note "3. SIGKILL a mount --nbd: its device is left behind, named, and reclaimed"
attach "$DIR/dev3" "$URL/disk" "$DEV"
kill -KILL "$attached_pid"
wait "$attached_pid" 2>/dev/null || true
[[ -e /sys/block/${DEV#/dev/}/pid ]] || fail "$DEV was released without a detach"
rc=0
"$MF" mount --nbd "$URL/disk" "$DEV" >/dev/null 2>"$DIR/refused" || rc=$?
cat "$DIR/refused"
((rc != 0)) || fail "attached over a device left behind"
grep -q "$DEV: left behind by memfabric process $attached_pid" "$DIR/refused" || fail "the error does not name $DEV"
grep -q -- "--reclaim" "$DIR/refused" || fail "the error does not suggest --reclaim"
attach "$DIR/dev4" "$URL/disk" "$DEV" --reclaim
dd if="$DEV" of=/dev/null bs=1M count=8 iflag=direct status=none || fail "reading the reclaimed $DEV"
detach "$attached_pid" "$DEV" TERM
echo "$DEV reclaimed"

# ---- 3b. SIGINT before swapon -----------------------------------------------------------------
# A user who sees a wrong URL while `memfabric swap` connects presses Ctrl-C: the region must
# not be overwritten by mkswap. The server is stopped meanwhile, so the signal surely comes
# while the client waits for it.
note "3b. SIGINT to memfabric swap while it attaches: it detaches before mkswap"
"$MF" read "$URL/disk" 0 65536 | sha256sum >"$DIR/disk-head" || fail "memfabric read $URL/disk"
kill -STOP "$server_pid"
"$MF" swap "$URL/disk" --log-level info >/dev/null 2>"$DIR/early.log" &
early_pid=$!
_spawned+=("$early_pid")
wait_blocking "$early_pid" 2 # SIGINT: sent before, it would be lost (ignored in a background job)
sleep 0.5                    # on its way to the stopped server
kill -INT "$early_pid"
kill -CONT "$server_pid"
rc=0
wait "$early_pid" || rc=$?
cat "$DIR/early.log"
((rc == 130)) || fail "memfabric swap exited with $rc, not 130, on a SIGINT before its swapon"
early_dev=$(sed -n 's|^SIGINT before swapon: detaching \(/dev/nbd[0-9]*\);.*|\1|p' "$DIR/early.log")
[[ -n $early_dev ]] || fail "memfabric swap did not say it detached before swapon"
device_free "$early_dev"
"$MF" read "$URL/disk" 0 65536 | sha256sum | cmp -s - "$DIR/disk-head" || fail "mkswap wrote the region"
echo "SIGINT before swapon: $early_dev detached, the region untouched"

# ---- 4. swap ----------------------------------------------------------------------------------
if [[ $NO_SWAP == --no-swap ]]; then
  echo "PASS: mmap, ext4 across re-attach and reclaim through memfabric's /dev/nbdX ($SCHEME; swap not asked)"
  exit 0
fi
note "4. memfabric swap $URL/swap; a process larger than free memory"
swapoff -a 2>/dev/null || true
: >"$DIR/swapdev"  # before the spawn, whose redirection truncates it only once it runs
"$MF" swap "$URL/swap" --priority 100 --log-level info >"$DIR/swapdev" 2>"$DIR/swap.log" &
swap_pid=$!
_spawned+=("$swap_pid")
deadline=$((SECONDS + 60))
until [[ -s $DIR/swapdev ]]; do
  kill -0 "$swap_pid" 2>/dev/null || { cat "$DIR/swap.log" >&2; fail "memfabric swap exited"; }
  ((SECONDS < deadline)) || fail "memfabric swap printed no device in 60s"
  sleep 0.1
done
SWAPDEV=$(cat "$DIR/swapdev")
grep -q "^$SWAPDEV " /proc/swaps || fail "$SWAPDEV is not in /proc/swaps"
cat /proc/swaps
# Take memory away as huge pages (never swapped) until about LEFT_FREE_MIB is available.
avail_mib() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
take=$((($(avail_mib) - LEFT_FREE_MIB) / 2))
((take > 0)) && echo $(($(cat /proc/sys/vm/nr_hugepages) + take)) >/proc/sys/vm/nr_hugepages
alloc=$(($(avail_mib) + OVERFLOW_MIB))
echo "MemAvailable $(avail_mib) MiB, huge pages $(cat /proc/sys/vm/nr_hugepages); allocating $alloc MiB"
start=$SECONDS
"$PY" - "$alloc" "$SWAPDEV" <<'EOF' >"$DIR/stress.out" || { cat "$DIR/stress.out"; fail "the allocating process failed"; }
import mmap, struct, sys
mib, dev = int(sys.argv[1]), sys.argv[2]
PAGES = 256  # per MiB
def chunk(i):  # every 4 KiB page holds its own number, 512 times
    return b"".join(struct.pack("<Q", i * PAGES + p) * 512 for p in range(PAGES))
def swap_used_kib():
    for line in open("/proc/swaps"):
        f = line.split()
        if f[0] == dev:
            return int(f[3])
    return 0
m = mmap.mmap(-1, mib << 20, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
peak = 0
for i in range(mib):
    m[i << 20:(i + 1) << 20] = chunk(i)
    if i % 32 == 0:
        peak = max(peak, swap_used_kib())
peak = max(peak, swap_used_kib())
# Newest first: the resident tail is checked before the swapped-out head comes back in
# (in address order, each page read in would push out one still to be checked).
bad = sum(1 for i in reversed(range(mib)) if m[i << 20:(i + 1) << 20] != chunk(i))
vm = dict(l.split() for l in open("/proc/vmstat"))
print(f"allocated {mib} MiB; swap used at most {peak // 1024} MiB; {bad} MiB differ; pswpout {vm['pswpout']} pswpin {vm['pswpin']}")
sys.exit(1 if bad else 0)
EOF
cat "$DIR/stress.out"
peak=$(sed -n 's/.*swap used at most \([0-9]*\) MiB.*/\1/p' "$DIR/stress.out")
((peak >= OVERFLOW_MIB / 2)) || fail "only ${peak} MiB went to $SWAPDEV: the process did not really swap"
echo "round trip through remote swap in $((SECONDS - start)) s"
echo $((SWAP_MIB / 2)) >/proc/sys/vm/nr_hugepages

# A swapoff that fails must leave the swap on and served. Under strict overcommit the kernel
# refuses swapoff (ENOMEM) unless what is committed fits without the swap area: allow a
# little less than is committed now, which still leaves about a swap area's worth for forks.
note "4b. swapoff refused (strict overcommit): memfabric swap keeps $SWAPDEV on and served"
committed_kib=$(awk '/^Committed_AS:/ {print $2}' /proc/meminfo)
((committed_kib > 65536)) || fail "only ${committed_kib} KiB committed: too little to make swapoff fail"
saved_overcommit=$(cat /proc/sys/vm/overcommit_memory) saved_ratio=$(cat /proc/sys/vm/overcommit_ratio)
echo $((committed_kib - 32768)) >/proc/sys/vm/overcommit_kbytes
echo 2 >/proc/sys/vm/overcommit_memory
restore_overcommit() {
  echo "$saved_overcommit" >/proc/sys/vm/overcommit_memory
  echo "$saved_ratio" >/proc/sys/vm/overcommit_ratio # and overcommit_kbytes back to 0
}
kill -TERM "$swap_pid"
deadline=$((SECONDS + 60))
until grep -q "stays attached, swapped on and served" "$DIR/swap.log"; do
  if ! kill -0 "$swap_pid" 2>/dev/null || ((SECONDS >= deadline)); then
    restore_overcommit
    cat "$DIR/swap.log" >&2
    fail "memfabric swap did not report the failed swapoff and keep serving"
  fi
  sleep 0.2
done
restore_overcommit
grep -q "^$SWAPDEV " /proc/swaps || fail "$SWAPDEV left /proc/swaps although swapoff failed"
dd if="$SWAPDEV" of=/dev/null bs=1M count=8 iflag=direct status=none ||
  fail "$SWAPDEV is not served after the failed swapoff"
grep -E "swapoff $SWAPDEV: .*(memory|ENOMEM)" "$DIR/swap.log" || fail "the swapoff error is not in the log"
detach "$swap_pid" "$SWAPDEV" TERM
grep -q "^$SWAPDEV " /proc/swaps && fail "$SWAPDEV is still in /proc/swaps"
grep -q "detached" "$DIR/swap.log" || fail "memfabric swap did not say it detached"
echo "PASS: mmap, ext4 across re-attach, reclaim, and remote swap through memfabric's /dev/nbdX ($SCHEME)"
