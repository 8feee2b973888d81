"""The lab's serial console: logged to a file and typed into through a unix socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from encryptrootfs_lab.cache import LabError
from encryptrootfs_lab.qemu import BootSpec, console_argv, qemu_argv, type_on


def test_console_is_a_socket_chardev_that_logs_to_the_console_file(tmp_path: Path) -> None:
    console, sock = tmp_path / "boot.console.log", Path("/tmp/erfs-con-x/console.sock")
    assert console_argv(console, sock) == [
        "-chardev",
        f"socket,id=con0,path={sock},server=on,wait=off,logfile={console},logappend=off",
        "-serial",
        "chardev:con0",
    ]


def test_without_a_socket_the_console_is_a_plain_file(tmp_path: Path) -> None:
    assert console_argv(tmp_path / "c.log", None) == ["-serial", f"file:{tmp_path / 'c.log'}"]


def test_a_comma_in_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="comma"):
        console_argv(tmp_path / "a,b.log", tmp_path / "s")


def test_the_console_is_the_first_serial_port_and_results_the_second(tmp_path: Path) -> None:
    spec = BootSpec(kernel=Path("/k"), initrd=Path("/i"), root_uuid="u", drives=())
    argv = qemu_argv(spec, tmp_path / "c.log", tmp_path / "r.log", None, tmp_path / "s")
    serials = [argv[i + 1] for i, a in enumerate(argv) if a == "-serial"]
    assert serials == ["chardev:con0", f"file:{tmp_path / 'r.log'}"]


def test_type_on_sends_the_text_to_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    got = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(64):
                    got.extend(chunk)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        type_on(path, "abc-def\n", settle=0.0)
        t.join(timeout=5)
    assert bytes(got) == b"abc-def\n"


def test_type_on_a_boot_that_is_not_running_says_so(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="is the boot still running"):
        type_on(tmp_path / "gone.sock", "x\n", settle=0.0)
