"""A small IMDSv2 client: region, instance id and "why are there no credentials?".

botocore fetches role credentials itself but never the region, and when it finds no
credentials it cannot say why. In early boot the network may have just come up, so every
request is retried with backoff within a budget. Only the stdlib is used (http.client: no proxy
variables are honoured, which is right for a link-local address). The session token is never
logged.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from ..errors import KeyServiceError
from ..log import get_logger

log = get_logger("imds")

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ImdsError(KeyServiceError):
    """The instance metadata service could not give what was asked; ``status`` if it answered."""

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        hint: Optional[str] = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, hint=hint, retryable=retryable)
        self.status = status


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes


class ImdsClient:
    """IMDSv2 requests with a session token, retries and an optional overall deadline."""

    def __init__(
        self,
        endpoint: str = "http://169.254.169.254",
        *,
        timeout: float = 2.0,
        attempts: int = 5,
        token_ttl: int = 300,
        deadline: Optional[float] = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self.timeout = timeout
        self.attempts = attempts
        self.token_ttl = token_ttl
        self.deadline = deadline  # time.monotonic() value after which no new attempt starts
        self._sleep = sleep
        self._token: Optional[str] = None

    # -- public lookups -------------------------------------------------------------------

    def region(self) -> str:
        return self.get("meta-data/placement/region").strip()

    def instance_id(self) -> str:
        return self.get("meta-data/instance-id").strip()

    def role_name(self) -> Optional[str]:
        """The instance profile's role, or None when no role is attached (IMDS answers 404)."""
        try:
            listing = self.get("meta-data/iam/security-credentials/")
        except ImdsError as e:
            if e.status == 404:
                return None
            raise
        names = [line.strip() for line in listing.splitlines() if line.strip()]
        return names[0] if names else None

    def identity_document(self) -> dict[str, object]:
        doc = json.loads(self.get("dynamic/instance-identity/document"))
        if not isinstance(doc, dict):
            raise ImdsError("the IMDS instance identity document is not a JSON object")
        return doc

    def get(self, path: str) -> str:
        """GET ``/latest/<path>`` with a session token; retried; 401 refreshes the token once."""
        url_path = "/latest/" + path.lstrip("/")
        refreshed = False
        while True:
            token = self._session_token()
            response = self._request("GET", url_path, {TOKEN_HEADER: token})
            if response.status == 200:
                return response.body.decode("utf-8", "replace")
            if response.status == 401 and not refreshed:
                # The token expired (or IMDS restarted): one fresh token, then give up.
                self._token = None
                refreshed = True
                continue
            raise self._explain(response.status, "GET", url_path)

    # -- plumbing -------------------------------------------------------------------------

    def _session_token(self) -> str:
        if self._token is None:
            response = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl)})
            if response.status != 200:
                raise self._explain(response.status, "PUT", TOKEN_PATH)
            self._token = response.body.decode("ascii", "replace").strip()
        return self._token

    def _explain(self, status: int, method: str, path: str) -> ImdsError:
        where = f"the instance metadata service at {self.endpoint}"
        if method == "PUT" and status == 403:
            return ImdsError(
                f"{where} refused to issue an IMDSv2 session token (HTTP 403): "
                "it is disabled for this instance or does not allow tokens.",
                status=status,
                hint="check that the instance metadata service is enabled for this instance "
                "(aws ec2 modify-instance-metadata-options --http-endpoint enabled); "
                "nothing was changed on disk",
            )
        if status == 403:
            return ImdsError(
                f"{where} answered 403 Forbidden for {path}: it is disabled for this instance.",
                status=status,
                hint="enable it (aws ec2 modify-instance-metadata-options --http-endpoint "
                "enabled) or configure region and credentials explicitly",
            )
        if status == 404:
            return ImdsError(f"{where} has no {path} (HTTP 404).", status=status)
        if status == 401:
            return ImdsError(
                f"{where} rejected the IMDSv2 session token for {path} (HTTP 401).",
                status=status,
                hint="check the instance clock and metadata options (http-tokens)",
            )
        return ImdsError(
            f"{where} kept failing for {method} {path} (last answer HTTP {status}, "
            f"{self.attempts} attempts).",
            status=status,
            hint="the service may still be starting; retry the boot or check the instance state",
            retryable=True,
        )

    def _request(self, method: str, path: str, headers: dict[str, str]) -> _Response:
        last_error = ""
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                if self.deadline is not None and time.monotonic() + delay >= self.deadline:
                    break
                self._sleep(delay)
                delay = min(delay * 2, 2.0)
            timeout = self.timeout
            if self.deadline is not None:
                timeout = min(timeout, max(0.05, self.deadline - time.monotonic()))
            try:
                response = self._once(method, path, headers, timeout)
            except (OSError, http.client.HTTPException) as e:
                last_error = _describe_os_error(e)
                log.debug("IMDS %s %s attempt %d: %s", method, path, attempt, last_error)
                continue
            if response.status in _RETRY_STATUSES and attempt < self.attempts:
                log.debug("IMDS %s %s attempt %d: HTTP %d", method, path, attempt, response.status)
                last_error = f"HTTP {response.status}"
                continue
            return response
        raise ImdsError(
            f"the instance metadata service at {self.endpoint} did not answer {method} {path} "
            f"({last_error or 'out of time'}, {self.attempts} attempts at most).",
            hint="check that this is an EC2 instance with the metadata service enabled and that "
            "the network is up (in the initramfs: the network hook ran); "
            "nothing was changed on disk",
            retryable=True,
        )

    def _once(self, method: str, path: str, headers: dict[str, str], timeout: float) -> _Response:
        conn: http.client.HTTPConnection
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return _Response(response.status, response.read())
        finally:
            conn.close()


def _describe_os_error(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}"
