"""An IMDSv2 emulator: the parts of the EC2 instance metadata service encryptrootfs uses.

Behaviour follows the AWS documentation and what botocore expects: ``PUT /latest/api/token``
with ``X-aws-ec2-metadata-token-ttl-seconds`` (1-21600) returns a session token; GETs carry it in
``X-aws-ec2-metadata-token``; an unknown or expired token is 401; without a token, 401 when
IMDSv2 is required (the default, as on hardened AMIs); everything is 403 when the service is
disabled. moto's IMDS checks no token and knows one fixed role, too thin for these tests.
"""

from __future__ import annotations

import json
import secrets
import socket
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .serving import serve_in_thread, stop_serving

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
MAX_TTL = 21600


@dataclass(frozen=True)
class ImdsRequest:
    """One request as the emulator saw it; the token value is never recorded."""

    time: float  # time.time()
    method: str
    path: str
    status: int
    had_token: bool


@dataclass
class _Fault:
    status: int
    times: int
    path_prefix: Optional[str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    emulator: ImdsEmulator


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, which is what IMDS clients expect to cope with.
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes; without this, Nagle + delayed ACK add ~40-100 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the emulator keeps its own log, without token values

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        emulator = self.server.emulator
        had_token = self.headers.get(TOKEN_HEADER) is not None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body, content_type = emulator._respond(method, self.path, self.headers)
        if emulator.delay_s:
            time.sleep(emulator.delay_s)
        data = body.encode("utf-8")
        # Logged before answering: a client that has its answer always finds it in the log.
        emulator._log(ImdsRequest(time.time(), method, self.path, status, had_token))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (a timeout test)


class ImdsEmulator:
    """IMDSv2 on 127.0.0.1; knobs are plain attributes or methods, safe to change while running."""

    def __init__(
        self,
        region: str = "us-east-1",
        instance_id: str = "i-0123456789abcdef0",
        role_name: Optional[str] = "encryptrootfs-test-role",
        account_id: str = "123456789012",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        require_v2: bool = True,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the IMDS emulator listens on the loopback address only")
        self.region = region
        self.instance_id = instance_id
        self.role_name = role_name  # None: no instance profile attached
        self.account_id = account_id
        self.host = host
        self._port = port
        self.require_v2 = require_v2
        self.disabled = False  # every request answered 403, as with http-endpoint disabled
        self.refuse_tokens = False  # token PUT answered 403
        self.delay_s = 0.0  # added before every answer
        self.access_key_id = "ASIA" + "".join(
            secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)
        )
        self.secret_access_key = secrets.token_urlsafe(30)
        self.session_token = secrets.token_urlsafe(60)
        self.requests: list[ImdsRequest] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None and not self._port:
            raise RuntimeError("the IMDS emulator is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ImdsEmulator:
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), _Handler)
        server.emulator = self
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = serve_in_thread(server, f"imds-emulator-{self._port}")
        return self

    def stop(self) -> None:
        """Stop serving; start() again reuses the same port (for "IMDS gone, then back")."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        stop_serving(server, thread)

    def __enter__(self) -> ImdsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- knobs ----------------------------------------------------------------------------

    def fail_next(
        self, status: int = 500, times: int = 1, path_prefix: Optional[str] = None
    ) -> None:
        """Answer the next ``times`` requests whose path starts with ``path_prefix``."""
        with self._lock:
            self._faults.append(_Fault(status, times, path_prefix))

    def expire_tokens(self) -> None:
        """Make every issued session token expired (the next GET with it gets 401)."""
        with self._lock:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_to(self, path_prefix: str) -> list[ImdsRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stopped inside the block, serving again (same port) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    # -- behaviour ------------------------------------------------------------------------

    def _log(self, entry: ImdsRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    def _take_fault(self, path: str) -> Optional[int]:
        with self._lock:
            for fault in self._faults:
                if fault.path_prefix is None or path.startswith(fault.path_prefix):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault.status
        return None

    def _respond(self, method: str, path: str, headers: Any) -> tuple[int, str, str]:
        text = "text/plain"
        fault = self._take_fault(path)
        if fault is not None:
            return fault, f"injected HTTP {fault}", text
        if self.disabled:
            return 403, "Forbidden", text
        if path == TOKEN_PATH:
            if method != "PUT":
                return 405, "Method Not Allowed", text
            return self._issue_token(headers)
        if method != "GET":
            return 405, "Method Not Allowed", text
        token = headers.get(TOKEN_HEADER)
        if token is not None:
            with self._lock:
                expiry = self._tokens.get(token)
            if expiry is None or expiry <= time.monotonic():
                return 401, "Unauthorized", text
        elif self.require_v2:
            return 401, "Unauthorized", text
        return self._metadata(path.split("?", 1)[0])

    def _issue_token(self, headers: Any) -> tuple[int, str, str]:
        if self.refuse_tokens:
            return 403, "Forbidden", "text/plain"
        if headers.get("X-Forwarded-For") is not None:
            return 403, "Forbidden", "text/plain"  # as AWS: tokens are not for proxied requests
        raw = headers.get(TTL_HEADER)
        try:
            ttl = int(raw) if raw is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TTL:
            return 400, "Bad Request", "text/plain"
        token = secrets.token_urlsafe(40)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
        return 200, token, "text/plain"

    def _metadata(self, path: str) -> tuple[int, str, str]:
        now = datetime.now(timezone.utc)
        iso = "%Y-%m-%dT%H:%M:%SZ"
        az = f"{self.region}a"
        documents: dict[str, str] = {
            "/latest/meta-data/": "ami-id\niam/\ninstance-id\nplacement/\n",
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/placement/": "availability-zone\nregion\n",
            "/latest/meta-data/placement/region": self.region,
            "/latest/meta-data/placement/availability-zone": az,
            "/latest/meta-data/ami-id": "ami-0123456789abcdef0",
            "/latest/dynamic/instance-identity/document": json.dumps(
                {
                    "accountId": self.account_id,
                    "architecture": "x86_64",
                    "availabilityZone": az,
                    "imageId": "ami-0123456789abcdef0",
                    "instanceId": self.instance_id,
                    "instanceType": "m6id.large",
                    "pendingTime": (now - timedelta(minutes=5)).strftime(iso),
                    "privateIp": "10.0.0.10",
                    "region": self.region,
                    "version": "2017-09-30",
                },
                indent=2,
            ),
        }
        if self.role_name is not None:
            profile = f"arn:aws:iam::{self.account_id}:instance-profile/{self.role_name}"
            documents.update(
                {
                    "/latest/meta-data/iam/": "info\nsecurity-credentials/\n",
                    "/latest/meta-data/iam/info": json.dumps(
                        {
                            "Code": "Success",
                            "LastUpdated": now.strftime(iso),
                            "InstanceProfileArn": profile,
                            "InstanceProfileId": "AIPA0123456789EXAMPLE",
                        }
                    ),
                    "/latest/meta-data/iam/security-credentials/": self.role_name,
                    f"/latest/meta-data/iam/security-credentials/{self.role_name}": json.dumps(
                        {
                            "Code": "Success",
                            "LastUpdated": now.strftime(iso),
                            "Type": "AWS-HMAC",
                            "AccessKeyId": self.access_key_id,
                            "SecretAccessKey": self.secret_access_key,
                            "Token": self.session_token,
                            "Expiration": (now + timedelta(hours=6)).strftime(iso),
                        }
                    ),
                }
            )
        body = documents.get(path)
        if body is None:
            return 404, "Not Found", "text/plain"
        content_type = "application/json" if body.startswith("{") else "text/plain"
        return 200, body, content_type
