"""KMS in several regions behind one address: each request goes to its region's emulator.

The product reaches KMS at one ``endpoint_url`` whatever the region (in AWS, botocore's
endpoint rules turn the region into ``kms.<region>.amazonaws.com``), and the lab gives the
guest one KMS address. The region a request is meant for is in its SigV4 credential scope, so
this router reads it there and relays the request to that region's :class:`KmsEmulator`.

A region whose emulator is stopped (``set_unreachable(True)``) is down: the router resets the
guest's connection without an answer, which is what the guest sees of any stopped emulator
(its connection ends at QEMU's relay). Each emulator keeps its own request log.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, Optional

from .kms import _CREDENTIAL_SCOPE, KmsEmulator
from .serving import serve_in_thread, stop_serving

# Per hop: never relayed (RFC 9110 7.6.1); Content-Length is set from the body read.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class KmsRegionRouter:
    """One loopback HTTP endpoint in front of one KMS emulator per region."""

    def __init__(self, regions: Mapping[str, KmsEmulator], *, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the KMS region router listens on the loopback address only")
        if not regions:
            raise ValueError("the KMS region router needs at least one region")
        self.regions = MappingProxyType(dict(regions))
        self.host = host
        self._port = 0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        # requests for a region that is not in ``regions`` (AWS: no such endpoint)
        self.unknown_regions: list[str] = []

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the KMS region router is not started")
        return self._port

    def start(self) -> KmsRegionRouter:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((self.host, self._port), _handler_for(self))
        server.daemon_threads = True
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = serve_in_thread(server, f"kms-region-router-{self._port}")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        stop_serving(server, thread)

    def __enter__(self) -> KmsRegionRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def target(self, authorization: str) -> Optional[KmsEmulator]:
        """The emulator a request signed with ``authorization`` is for (None: no such region)."""
        scope = _CREDENTIAL_SCOPE.search(authorization)
        if scope is None:
            return None
        emulator = self.regions.get(scope.group(1))
        if emulator is None:
            self.unknown_regions.append(scope.group(1))
        return emulator


def _handler_for(router: KmsRegionRouter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:
            pass  # each emulator keeps its own log

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            emulator = router.target(str(self.headers.get("Authorization", "")))
            if emulator is None or not emulator.running:
                self._reset()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = http.client.HTTPConnection(emulator.host, emulator.port, timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status, reason, answer = response.status, response.reason, response.getheaders()
            except OSError:  # stopped between the check and the request
                self._reset()
                return
            finally:
                conn.close()
            self.send_response_only(status, reason)
            for k, v in answer:
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _reset(self) -> None:
            # SO_LINGER 0: close with RST, no answer at all, like a service that is not there.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

        do_POST = _relay
        do_GET = _relay

    return Handler
