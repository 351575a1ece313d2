"""The one ctypes wrapper for the raw bpf(2) calls bcc does not offer (or offers per entry).

Map info, batched map reads and writes with flags, program test runs, object
pins, run-time statistics: each is one ``bpf(cmd, attr)`` with the head of
``union bpf_attr`` that command reads (linux/bpf.h; the kernel zero-extends a
shorter attr, so declaring only the fields used is enough).  Every failure is
a ``BpfError`` carrying the errno and a one-line reason.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from splitrelay.errors import SplitrelayError

NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]

# enum bpf_cmd (linux/bpf.h)
MAP_CREATE = 0
MAP_UPDATE_ELEM = 2
OBJ_PIN = 6
OBJ_GET = 7
PROG_TEST_RUN = 10
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
ENABLE_STATS = 32

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2   # map update flags
STATS_RUN_TIME = 0                          # enum bpf_stats_type
ENOTSUPP = 524                              # the kernel's "operation not supported", not in errno

_libc = ct.CDLL(None, use_errno=True)


class BpfError(SplitrelayError, OSError):
    """A bpf(2) call failed; ``errno`` is the kernel's reason."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


def bpf(cmd: int, attr: ct.Structure | ct.Array, what: str = "") -> int:
    """bpf(cmd, &attr, sizeof attr); returns the kernel's result (an fd for some commands)."""
    rc = _libc.syscall(NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if rc < 0:
        err = ct.get_errno() or errno.EINVAL
        raise BpfError(err, f"{what or f'bpf({cmd})'} failed: {os.strerror(err)}")
    return rc


# -- objects: info, pins, ids ------------------------------------------------------------------

class MapInfo(ct.Structure):
    """The head of ``struct bpf_map_info``."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


class ProgInfo(ct.Structure):
    """The head of ``struct bpf_prog_info`` up to ``run_cnt`` (the kernel fills what we size)."""

    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
    ]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _PinAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _GetFdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


def _info(fd: int, info: ct.Structure, what: str) -> None:
    bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)), what)


def map_info(fd: int) -> MapInfo:
    """A map's type, key and value size and capacity (BPF_OBJ_GET_INFO_BY_FD)."""
    info = MapInfo()
    _info(fd, info, "reading map info")
    return info


def prog_info(fd: int) -> ProgInfo:
    """A program's info, run-time statistics included (BPF_OBJ_GET_INFO_BY_FD)."""
    info = ProgInfo()
    _info(fd, info, "reading program info")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for the loaded program ``prog_id`` (close it)."""
    return bpf(PROG_GET_FD_BY_ID, _GetFdAttr(id=prog_id), f"opening BPF program {prog_id}")


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program at ``path`` on bpffs."""
    name = ct.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, _PinAttr(pathname=ct.addressof(name), bpf_fd=fd), f"pinning {path}")


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path`` (close it)."""
    name = ct.create_string_buffer(os.fsencode(path))
    return bpf(OBJ_GET, _PinAttr(pathname=ct.addressof(name)), f"opening {path}")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """A new, unpinned map (tests use it to stand for a map an older build pinned); close the fd."""
    attr = (ct.c_uint32 * 32)(map_type, key_size, value_size, max_entries)   # the rest of bpf_attr: 0
    return bpf(MAP_CREATE, attr, "creating a map")


def enable_run_time_stats() -> int:
    """Have the kernel time every BPF program run while the returned fd is open (BPF_ENABLE_STATS)."""
    return bpf(ENABLE_STATS, (ct.c_uint32 * 1)(STATS_RUN_TIME), "enabling BPF run-time statistics")


# -- map entries -------------------------------------------------------------------------------

class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64), ("value", ct.c_uint64),
                ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def map_update(map_fd: int, key, value, flags: int = BPF_ANY) -> bool:
    """Write one entry; with BPF_EXIST, False (not an error) when the key is gone."""
    attr = _ElemAttr(map_fd=map_fd, key=ct.addressof(key), value=ct.addressof(value), flags=flags)
    try:
        bpf(MAP_UPDATE_ELEM, attr, "updating a map entry")
    except BpfError as exc:
        if flags == BPF_EXIST and exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup_batches(map_fd: int, key_type, value_type, chunk: int, name: str = "map"):
    """Every (key, value) of a hash map, ``chunk`` at a time (BPF_MAP_LOOKUP_BATCH).

    One syscall per chunk instead of two per entry.  The pairs are views into
    buffers reused for the next chunk: copy what you keep (``from_buffer_copy``).
    Raises ``BpfError`` with EINVAL or ENOTSUPP on the first call where the
    kernel has no batch operations for this map (the caller falls back).
    """
    keys, values = (key_type * chunk)(), (value_type * chunk)()
    token = ct.c_uint64(0)   # the kernel's opaque position (a key-sized cookie: 4 bytes for hash maps)
    attr = _BatchAttr(out_batch=ct.addressof(token), keys=ct.addressof(keys), values=ct.addressof(values),
                      map_fd=map_fd)
    first = True
    while True:
        attr.count = chunk
        attr.in_batch = 0 if first else ct.addressof(token)
        rc = _libc.syscall(NR_BPF, MAP_LOOKUP_BATCH, ct.byref(attr), ct.sizeof(attr))
        err = ct.get_errno() if rc else 0
        if rc and err != errno.ENOENT:
            raise BpfError(err, f"reading map {name!r} failed: {os.strerror(err)}")
        for i in range(attr.count):
            yield keys[i], values[i]
        if rc or attr.count == 0:   # ENOENT: that was the last chunk
            return
        first = False


# -- program test runs -------------------------------------------------------------------------

class TestRunAttr(ct.Structure):
    __test__ = False   # not a pytest class
    _fields_ = [
        ("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32), ("_pad", ct.c_uint32),
    ]


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, headroom: int = 256) -> tuple[int, bytes, int]:
    """Run a program on ``packet`` (BPF_PROG_TEST_RUN): (return value, output bytes, ns per run)."""
    data_in = ct.create_string_buffer(bytes(packet), len(packet))
    out_size = len(packet) + headroom
    data_out = ct.create_string_buffer(out_size)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet), data_size_out=out_size,
                       data_in=ct.addressof(data_in), data_out=ct.addressof(data_out), repeat=repeat)
    bpf(PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return attr.retval, data_out.raw[:attr.data_size_out], attr.duration
