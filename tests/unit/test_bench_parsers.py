"""The benchmarks' parsers: what `make bench` reads from systemd-analyze and from initramfs
images. (The measurements themselves run under `make bench`, never as tests.)"""

from __future__ import annotations

import pytest
from bench.boots import parse_startup
from bench.initramfs import _cpio_entries, component


def test_startup_line_with_seconds_milliseconds_and_minutes() -> None:
    line = ("Startup finished in 3.112s (kernel) + 1min 9.875s (initrd) + 512ms (userspace) "
            "= 1min 13.499s")
    got = parse_startup(line)
    assert got == pytest.approx({"kernel": 3.112, "initrd": 69.875, "userspace": 0.512,
                                 "total": 73.499})  # fmt: skip


def test_a_line_without_phases_gives_nothing() -> None:
    assert parse_startup("Bootup is not yet finished") == {}


def _newc(name: str, data: bytes, mode: int = 0o100644) -> bytes:
    namesize = len(name) + 1
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, namesize, 0]
    head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def test_cpio_entries_lists_regular_files_with_their_offsets_and_sizes() -> None:
    archive = (_newc("usr/bin/python3.11", b"x" * 5) + _newc("usr/lib", b"", 0o040755)
               + _newc("etc/a", b"hello") + _newc("TRAILER!!!", b""))  # fmt: skip
    entries, end = _cpio_entries(archive)
    assert [(n, s) for n, _, s in entries] == [("usr/bin/python3.11", 5), ("etc/a", 5)]
    _, offset, size = entries[1]
    assert archive[offset:offset + size] == b"hello"
    assert end == len(archive)


def test_cpio_entries_refuses_what_is_not_newc() -> None:
    with pytest.raises(ValueError, match="not a newc cpio header"):
        _cpio_entries(b"\x1f\x8b compressed")


def test_unknown_paths_are_other() -> None:
    assert component("some/unknown/file") == "other"
