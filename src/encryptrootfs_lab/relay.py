"""``guestfwd cmd:`` helper: relays one guest TCP connection to a port on 127.0.0.1.

QEMU starts ``python -m encryptrootfs_lab.relay PORT`` for every connection the guest opens to
a forwarded address and connects that connection to our stdin/stdout. We connect to
``127.0.0.1:PORT`` and copy bytes both ways until either side closes. The destination host is
not a parameter: the lab never lets a guest reach anything but the host's loopback.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

LOOPBACK = "127.0.0.1"


def relay(port: int, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Copy between the guest (stdin/stdout) and ``127.0.0.1:port`` until one side is done."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sel = selectors.DefaultSelector()
    sel.register(stdin_fd, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "server")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "guest":
                    data = os.read(stdin_fd, 65536)
                    if not data:
                        sel.unregister(stdin_fd)
                        sock.shutdown(socket.SHUT_WR)
                    else:
                        sock.sendall(data)
                else:
                    data = sock.recv(65536)
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        written = os.write(stdout_fd, view)
                        view = view[written:]
    finally:
        sel.close()
        sock.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or not 0 < int(argv[1]) < 65536:
        sys.stderr.write("usage: python -m encryptrootfs_lab.relay PORT  (to 127.0.0.1:PORT)\n")
        return 2
    try:
        relay(int(argv[1]))
    except OSError as exc:
        sys.stderr.write(f"encryptrootfs_lab.relay: 127.0.0.1:{argv[1]}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
