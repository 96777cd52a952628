#!/usr/bin/env bash
# The soft-RoCE device exists, its port is ACTIVE over the dummy netdev, and it carries a
# RoCE v2 GID for the test address.
# shellcheck source=tests/vm/guest/lib.sh
. "$(dirname "$0")/lib.sh"
need_vm
dev=$MF_VM_RDMA_DEV

note "ibv_devices"
devices=$(ibv_devices)
echo "$devices"
grep -qw "$dev" <<<"$devices" || fail "$dev is not listed by ibv_devices"

note "ibv_devinfo -v -d $dev"
info=$(ibv_devinfo -v -d "$dev")
grep -E 'state:|link_layer:|GID\[' <<<"$info"
grep -qE 'state:[[:space:]]+PORT_ACTIVE' <<<"$info" || fail "$dev port is not PORT_ACTIVE"
grep -qE 'link_layer:[[:space:]]+Ethernet' <<<"$info" || fail "$dev is not on Ethernet"
grep -qE "GID\[ *[0-9]+\]:[[:space:]]+::ffff:$MF_VM_ADDR, RoCE v2" <<<"$info" ||
  fail "$dev has no RoCE v2 GID for $MF_VM_ADDR"

note "rdma link show $dev/1"
link=$(rdma link show "$dev/1")
echo "$link"
[[ $link == *"state ACTIVE"* && $link == *"netdev $MF_VM_NETDEV"* ]] ||
  fail "rdma link: $dev/1 is not ACTIVE on $MF_VM_NETDEV"
echo "PASS: $dev is ACTIVE on $MF_VM_NETDEV ($MF_VM_ADDR)"
