"""The benchmarks' parsers: what `make bench` reads from systemd-analyze and from initramfs
images. (The measurements themselves run under `make bench`, never as tests.)"""

from __future__ import annotations

import pytest
from bench.boots import parse_startup
from bench.initramfs import _cpio_entries, component


def test_startup_line_with_seconds_milliseconds_and_minutes() -> None:
    line = (
        "Startup finished in 3.112s (kernel) + 1min 9.875s (initrd) + 512ms (userspace) "
        "= 1min 13.499s"
    )
    got = parse_startup(line)
    assert got == pytest.approx(
        {"kernel": 3.112, "initrd": 69.875, "userspace": 0.512, "total": 73.499}
    )


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
    archive = (
        _newc("usr/bin/python3.11", b"x" * 5)
        + _newc("usr/lib", b"", 0o040755)
        + _newc("etc/a", b"hello")
        + _newc("TRAILER!!!", b"")
    )
    entries, end = _cpio_entries(archive)
    assert [(n, s) for n, _, s in entries] == [("usr/bin/python3.11", 5), ("etc/a", 5)]
    _, offset, size = entries[1]
    assert archive[offset : offset + size] == b"hello"
    assert end == len(archive)


def test_cpio_entries_refuses_what_is_not_newc() -> None:
    with pytest.raises(ValueError, match="not a newc cpio header"):
        _cpio_entries(b"\x1f\x8b compressed")


def test_unknown_paths_are_other() -> None:
    assert component("some/unknown/file") == "other"


def _engine(write: float, read: float, inplace: float, ossl: float) -> dict[str, object]:
    return {
        "write": {"mib_s": write},
        "read": {"mib_s": read},
        "inplace": {"mib_s": inplace},
        "openssl_xts_mib_s": ossl,
        "openssl_xts_no_aesni_mib_s": ossl / 2,
        "cryptsetup_benchmark_mib_s": {"encrypt": 50.0, "decrypt": 60.0},
    }


def _variant(
    name: str, mib_s: float, user_s: float, seconds: float = 10.0, **extra: object
) -> dict[str, object]:
    return {
        "name": name,
        "ok": True,
        "stage": "resume",
        "mib": mib_s * seconds,
        "mib_s": mib_s,
        "seconds": seconds,
        "user_s": user_s,
        "sys_s": 0.5,
        "ios": 700,
        "read_mib": 224.0,
        "write_mib": 241.0,
        **extra,
    }


def test_throughput_reason_gives_the_ratios_to_the_engine_limits() -> None:
    from bench.report import throughput_reason

    disk = {
        "variants_disk_mib": 256,
        "engine": [_engine(40.0, 80.0, 36.0, 12.0), _engine(60.0, 100.0, 44.0, 8.0)],
        "variants": [
            _variant("product", 9.0, 9.5),
            _variant("product again", 11.0, 9.0),
            _variant("online (opened with dm-crypt first)", 7.0, 8.0),
            _variant("product, OpenSSL without AES-NI", 2.5, 9.8),
            {
                "name": "resilience journal",
                "ok": False,
                "stage": "init",
                "err": "Invalid resilience mode.\n",
            },
        ],
    }
    text = throughput_reason(disk)
    assert text is not None
    # product rate = mean(9, 11) = 10; OpenSSL = mean(12, 8) = 10; in-place = mean(36, 44) = 40
    assert "ran at 10.0 MiB/s" in text
    assert "user space 92% of the time" in text  # mean(9.5/10, 9/10)
    assert "reaches 1.00 of its own cipher's speed and 0.25 of dm-crypt's in-place copy" in text
    # user CPU per MiB: mean(9.5 s / 90 MiB, 9.0 s / 110 MiB) = 94 ms; OpenSSL: 1000 / 10 MiB/s
    assert "spends 94 ms of user CPU per MiB where OpenSSL's own XTS benchmark needs 100 ms" in text
    assert "online (opened with dm-crypt first) 7.0 MiB/s" in text
    # OpenSSL: mean(12, 8) = 10 vs mean(6, 4) = 5 without AES-NI; the pass 10 vs 2.5
    assert "the pass slows 4.0x (2.50 MiB/s) as OpenSSL's XTS slows 2.0x" in text
    assert "resilience journal: refused by cryptsetup at init (Invalid resilience mode.)" in text


def test_throughput_reason_needs_the_variants() -> None:
    from bench.report import throughput_reason

    assert throughput_reason({"throughput": [], "engine": [], "variants": []}) is None
