"""Host-side pieces of the lab that need no guest: the loopback relay and partition tables."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from encryptrootfs_lab import partition


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
        input=b"ping from the guest\n", capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    t.join(5)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert got == [b"ping from the guest\n"]
    assert proc.stdout == b"pong:ping from the guest\n"


def test_relay_refuses_anything_but_a_port_number() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "encryptrootfs_lab.relay", "example.com:80"],
        capture_output=True, timeout=20, check=False,
    )  # fmt: skip
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
        (2048, 8192, "boot"), (10240, 20480, "root"),
    ]  # fmt: skip

    mbr = tmp_path / "mbr.img"
    mbr.write_bytes(b"")
    with open(mbr, "r+b") as f:
        f.truncate(32 * 1024 * 1024)
    partition.write_mbr(mbr, 0x1234ABCD, parts)
    table = _sfdisk_json(mbr)
    assert table["label"] == "dos"
    assert table["id"] == "0x1234abcd"
    assert [(p["start"], p["size"], p["type"]) for p in table["partitions"]] == [
        (2048, 8192, "83"), (10240, 20480, "83"),
    ]  # fmt: skip
