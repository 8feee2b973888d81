"""Host-side pieces of the lab that need no guest: relay, partition tables, raw disk helpers."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from encryptrootfs_lab import partition
from encryptrootfs_lab.layout import Disk
from encryptrootfs_lab.testtree import PLAINTEXT_MARKER


def test_relay_carries_a_connection_to_a_loopback_port_both_ways() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(4096)
            got.append(data)
            conn.sendall(b"pong:" + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    proc = subprocess.run(
        [sys.executable, "-m", "encryptrootfs_lab.relay", str(port)],
        input=b"ping from the guest\n",
        capture_output=True,
        timeout=20,
        check=False,
    )
    t.join(5)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert got == [b"ping from the guest\n"]
    assert proc.stdout == b"pong:ping from the guest\n"


def test_relay_refuses_anything_but_a_port_number() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "encryptrootfs_lab.relay", "example.com:80"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 2
    assert b"127.0.0.1" in proc.stderr


def _sfdisk_json(path: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, check=True)
    return json.loads(out.stdout)["partitiontable"]  # type: ignore[no-any-return]


def test_gpt_and_mbr_written_by_the_lab_are_what_sfdisk_reads(tmp_path: Path) -> None:
    parts = [
        partition.Partition(2048, 8192, "boot", uuid.UUID(int=2)),
        partition.Partition(10240, 20480, "root", uuid.UUID(int=3)),
    ]
    gpt = tmp_path / "gpt.img"
    gpt.write_bytes(b"")
    with open(gpt, "r+b") as f:
        f.truncate(32 * 1024 * 1024)
    partition.write_gpt(gpt, 512, uuid.UUID(int=1), parts)
    verify = subprocess.run(["sfdisk", "--verify", str(gpt)], capture_output=True, text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout
    table = _sfdisk_json(gpt)
    assert table["label"] == "gpt"
    assert table["id"] == str(uuid.UUID(int=1)).upper()
    assert [(p["start"], p["size"], p["name"]) for p in table["partitions"]] == [
        (2048, 8192, "boot"),
        (10240, 20480, "root"),
    ]

    mbr = tmp_path / "mbr.img"
    mbr.write_bytes(b"")
    with open(mbr, "r+b") as f:
        f.truncate(32 * 1024 * 1024)
    partition.write_mbr(mbr, 0x1234ABCD, parts)
    table = _sfdisk_json(mbr)
    assert table["label"] == "dos"
    assert table["id"] == "0x1234abcd"
    assert [(p["start"], p["size"], p["type"]) for p in table["partitions"]] == [
        (2048, 8192, "83"),
        (10240, 20480, "83"),
    ]


def test_raw_disk_helpers_see_what_the_guest_sees_through_an_overlay(tmp_path: Path) -> None:
    from encryptrootfs_lab.layout import disk_contains, disk_sha256, images_identical
    from encryptrootfs_lab.qemu import create_overlay

    marker = b"ERFS-TEST-MARKER-0123456789"
    base = tmp_path / "base.raw"
    data = bytearray(16 * 1024 * 1024)
    cut = 8 * 1024 * 1024 - 10  # straddles the helpers' 8 MiB read chunks
    data[cut : cut + len(marker)] = marker
    base.write_bytes(bytes(data))
    overlay = create_overlay(base, tmp_path / "over.qcow2")

    assert disk_contains(overlay, [marker, b"never-written"]) == {
        marker: True,
        b"never-written": False,
    }
    assert disk_sha256(overlay) == hashlib.sha256(data).hexdigest()
    assert images_identical(overlay, base)

    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x41 {cut} 4096", str(overlay)],
        check=True,
        capture_output=True,
    )
    assert not images_identical(overlay, base)
    assert disk_contains(overlay, [marker]) == {marker: False}
    assert disk_sha256(overlay) != hashlib.sha256(data).hexdigest()
    assert base.read_bytes() == bytes(data)  # the overlay took the write
    assert not list(tmp_path.glob("*.flat"))  # no scratch copies left behind


def test_plain_root_disk_holds_the_plaintext_marker(root_disk: Disk) -> None:
    """Issue 4 proves encryption by this marker vanishing from the raw disk: it must be there."""
    from encryptrootfs_lab.layout import disk_contains

    assert disk_contains(root_disk.path, [PLAINTEXT_MARKER], fmt="raw") == {PLAINTEXT_MARKER: True}
