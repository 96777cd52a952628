# Drives an nbd::Export with libnbd through nbdsh: every command, edge offsets (0, end-1,
# end, past the end), zero-length requests, FUA, trim/zero semantics, flag checks,
# structured and simple replies, multi-conn, opt mode (INFO, LIST) and a read-only export.
# Run by nbd_tools_test as
#   nbdsh -n -c "exec(open('nbd_commands.py').read())"
# with NBD_URI (writable export), NBD_RO_URI (read-only export, may be empty), NBD_SIZE.
import errno
import os
import random

import nbd

URI = os.environ["NBD_URI"]
RO_URI = os.environ.get("NBD_RO_URI", "")
SIZE = int(os.environ["NBD_SIZE"])
MAX_BLOCK = 32 * 1024 * 1024


def connect(uri, structured=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)  # let bad requests reach the server
    h.connect_uri(uri)
    return h


def expect_errno(want, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno)  # name or number
        assert got == want, "%s%r: errno %s, wanted %s (%s)" % (fn.__name__, args, e.errno, want, e.string)
        return
    raise AssertionError("%s%r succeeded, wanted errno %d" % (fn.__name__, args, want))


def check_flags(h, read_only):
    assert h.get_size() == SIZE, h.get_size()
    assert h.is_read_only() == read_only
    assert h.can_flush()
    assert h.can_multi_conn()
    assert h.can_cache()
    assert h.can_fua() != read_only
    assert h.can_trim() != read_only
    assert h.can_zero() != read_only
    assert h.can_fast_zero() != read_only
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_BLOCK


def commands(structured):
    h = connect(URI, structured=structured, strict=False)
    check_flags(h, False)
    assert h.get_structured_replies_negotiated() == structured
    assert h.can_df() == structured
    rnd = random.Random(7)
    # Edge offsets: 0, end-1, a page at the end, one byte and a page across the middle.
    for off, n in [(0, 1), (0, 4096), (SIZE - 1, 1), (SIZE - 4096, 4096), (SIZE // 2 - 1, 2), (12345, 300000)]:
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        h.pwrite(data, off)
        assert h.pread(n, off) == data, (off, n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA)
        assert h.pread(n, off) == data
    # A read at the end of length 0 is fine; anything past the end is not.
    assert h.pread(0, SIZE) == b""
    expect_errno(errno.EINVAL, h.pread, 1, SIZE)
    expect_errno(errno.EINVAL, h.pread, 2, SIZE - 1)
    expect_errno(errno.EINVAL, h.pread, 4096, 2**64 - 1024)
    expect_errno(errno.ENOSPC, h.pwrite, b"xy", SIZE - 1)
    expect_errno(errno.ENOSPC, h.pwrite, b"x", SIZE)
    expect_errno(errno.EINVAL, h.trim, 1, SIZE)
    expect_errno(errno.ENOSPC, h.zero, 4096, SIZE - 1)
    expect_errno(errno.EINVAL, h.cache, 1, SIZE)
    # Larger than the maximum block size.
    expect_errno(errno.EINVAL, h.pread, MAX_BLOCK + 1, 0)
    # A flag the command does not take.
    expect_errno(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)
    if structured:
        assert len(h.pread(65536, 0, nbd.CMD_FLAG_DF)) == 65536
        # base:allocation: one extent of allocated data (status 0) for the whole request.
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        extents = []
        h.block_status(65536, SIZE - 65536, lambda ctx, off, entries, err: extents.append((ctx, off, entries)))
        assert extents == [(nbd.CONTEXT_BASE_ALLOCATION, SIZE - 65536, [65536, 0])], extents
        expect_errno(errno.EINVAL, h.block_status, 1, SIZE, lambda *a: 0)
    else:
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    # Flush and cache.
    h.flush()
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(65536, 0)
    # Zero-length write, trim, zero and cache succeed and change nothing, also at the end;
    # one byte further is past the end.
    before = h.pread(4096, 0)
    for off in (0, 4095, SIZE):
        h.pwrite(b"", off)
        h.pwrite(b"", off, nbd.CMD_FLAG_FUA)
        h.trim(0, off)
        h.trim(0, off, nbd.CMD_FLAG_FUA)
        h.zero(0, off)
        h.zero(0, off, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        h.cache(0, off)
    assert h.pread(4096, 0) == before
    expect_errno(errno.ENOSPC, h.pwrite, b"", SIZE + 1)
    expect_errno(errno.EINVAL, h.trim, 0, SIZE + 1)
    expect_errno(errno.ENOSPC, h.zero, 0, SIZE + 1)
    expect_errno(errno.EINVAL, h.cache, 0, SIZE + 1)
    # Trim succeeds and discards nothing: the data reads back unchanged. Zero reads back as
    # zeroes; NO_HOLE and FUA are accepted; FAST_ZERO fails fast with ENOTSUP and changes
    # nothing.
    pattern = b"\xa5" * (1 << 20)
    h.pwrite(pattern, 0)
    h.trim(4096, 4096)
    assert h.pread(4096, 4096) == pattern[:4096]
    h.zero(8192, 16384, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(8192, 16384) == b"\0" * 8192
    assert h.pread(4096, 16384 + 8192) == pattern[:4096]  # just past the zeroed range
    expect_errno(errno.ENOTSUP, h.zero, 4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4096, 65536) == pattern[:4096]
    tail = h.pread(4096, SIZE - 4096)
    h.trim(SIZE, 0, nbd.CMD_FLAG_FUA)  # the whole export, beyond any single request size
    assert h.pread(4096, SIZE - 4096) == tail
    assert h.pread(4096, 0) == pattern[:4096]
    assert h.pread(8192, 16384) == b"\0" * 8192
    # Many requests in flight at once, completed out of order by the server as it likes.
    bufs = []
    for i in range(64):
        off = (i * 7919 * 4096) % (SIZE - 65536)
        data = bytes([i]) * 65536
        h.aio_pwrite(data, off)
        bufs.append((off, data))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads = []
    for off, data in bufs[-16:]:
        buf = nbd.Buffer(65536)
        h.aio_pread(buf, off)
        reads.append((buf, off))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    expected = {}
    for off, data in bufs:
        expected[off] = data  # later writes to the same offset win
    for buf, off in reads:
        assert buf.to_bytearray() == expected[off], off
    h.shutdown()


def multi_conn():
    a = connect(URI)
    b = connect(URI)
    a.pwrite(b"multi-conn", 1 << 20)
    a.flush()
    assert b.pread(10, 1 << 20) == b"multi-conn"
    a.shutdown()
    b.shutdown()


def opt_mode():
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(URI)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    assert h.get_export_name() in names, names
    h.opt_info()
    assert h.get_size() == SIZE
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
        raise AssertionError("opt_info of an unknown export succeeded")
    except nbd.Error:
        pass
    h.opt_abort()


def unknown_export():
    h = nbd.NBD()
    try:
        h.connect_uri(URI.replace(":///", ":///no-such-export-") if ":///" in URI else URI + "x")
        raise AssertionError("connected to an unknown export")
    except nbd.Error:
        pass


def read_only():
    h = connect(RO_URI, strict=False)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero() and not h.can_fua()
    h.pread(4096, 0)
    expect_errno(errno.EPERM, h.pwrite, b"x", 0)
    expect_errno(errno.EPERM, h.trim, 4096, 0)
    expect_errno(errno.EPERM, h.zero, 4096, 0)
    # FUA and FAST_ZERO are not advertised here: flags a command may not carry (EINVAL).
    expect_errno(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_FUA)
    expect_errno(errno.EINVAL, h.flush, nbd.CMD_FLAG_FUA)
    expect_errno(errno.EINVAL, h.cache, 4096, 0, nbd.CMD_FLAG_FUA)
    expect_errno(errno.EINVAL, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.flush()
    h.shutdown()


commands(True)
commands(False)
multi_conn()
opt_mode()
unknown_export()
if RO_URI:
    read_only()
print("nbd_commands: all checks passed")
