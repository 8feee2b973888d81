"""A KMS emulator: moto's KMS over real HTTP on 127.0.0.1, behind a middleware of our own.

moto does real AES-GCM envelope encryption and checks the encryption context (measured in
shared/reference/kms-emulation.md); it does not enforce key states, cannot inject faults and
keeps no request log. The WSGI middleware here adds exactly that, so tests can say "KMS
throttled twice", "the key is disabled" or "KMS went away and came back" against the same code
path botocore uses in production.

moto keeps its state in process-global backends keyed by account and region: every request is
pinned to this emulator's account (moto's ``x-moto-account-id`` header), whatever access key the
client signed with.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import io
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Optional

from .policy import KmsRequestFacts, allows
from .serving import serve_in_thread, stop_serving

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_DATA_PLANE = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "ReEncrypt",
    }
)
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/[0-9]{8}/([a-z0-9-]+)/kms/")
_ACCESS_KEY = re.compile(r"Credential=([A-Z0-9]+)/")
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_KEY_UUID_BYTES = 36  # moto's ciphertext blob starts with the key id as text


@dataclass(frozen=True)
class KmsRequest:
    """One KMS request as the emulator saw it. Bodies (Plaintext!) are never kept."""

    time: float  # time.time()
    action: str  # e.g. "Decrypt", from X-Amz-Target
    key_id: Optional[str]  # the request's KeyId, else the key named inside the ciphertext
    encryption_context: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    status: int = 200
    error_code: Optional[str] = None
    region: Optional[str] = None  # from the request's SigV4 credential scope
    # The key ``key_id`` resolves to (alias, key id or ARN alike), None when it names no key:
    # "which key was used" without caring how the client spelled it.
    key_arn: Optional[str] = None


@dataclass
class _Injection:
    action: Optional[str]
    error_code: str
    times: int
    message: str
    status: int


class _TokenBucket:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KmsEmulator:
    """moto KMS on 127.0.0.1 with a request log and fault knobs; thread-safe."""

    def __init__(
        self,
        region: str = "us-east-1",
        account_id: Optional[str] = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the KMS emulator listens on the loopback address only")
        self.region = region
        # moto's state is process-global per account: a fresh account per emulator keeps two
        # emulators (or two tests) from seeing each other's keys and aliases.
        self.account_id = account_id or f"{secrets.randbelow(10**11) + 10**11:012d}"
        self.host = host
        self._port = port
        self.requests: list[KmsRequest] = []
        self._lock = threading.Lock()
        self._injections: list[_Injection] = []
        self._denied: Optional[set[Optional[str]]] = None
        self._bucket: Optional[_TokenBucket] = None
        # AWS refuses a request signed more than 5 minutes away from its own clock (moto does
        # not check); None turns the check off.
        self.max_clock_skew_s: Optional[float] = 300.0
        self.clock_offset_s = 0.0  # how far the emulated AWS clock is ahead of this host's
        # A key policy evaluated for every data-plane request (emulators/policy.py), as AWS
        # would; None: no policy check (moto's default). Callers are known by their access
        # key: see trust_instance().
        self.key_policy: Optional[Mapping[str, Any]] = None
        self._instances: dict[str, tuple[str, str]] = {}  # access key -> (role ARN, instance ARN)
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None
        self._app: Optional[WsgiApp] = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the KMS emulator is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> KmsEmulator:
        if self._server is not None:
            return self
        from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):  # type: ignore[misc]
            # The emulator keeps its own log; werkzeug's would fill test output and consoles.
            def log(self, type: str, message: str, *args: Any) -> None:
                pass

        if self._app is None:
            self._app = create_backend_app("kms")
        server = make_server(
            self.host, self._port, self._middleware, threaded=True, request_handler=QuietHandler
        )
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = serve_in_thread(server, f"kms-emulator-{self._port}")
        return self

    def stop(self) -> None:
        """Stop serving; keys survive and start() listens on the same port again."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        stop_serving(server, thread)

    def set_unreachable(self, unreachable: bool) -> None:
        """Connections refused while True; the same port serves again when set back."""
        if unreachable:
            self.stop()
        else:
            self.start()

    def __enter__(self) -> KmsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- keys (directly in moto's backend: no request, no log entry) -----------------------

    def _backend(self, region: Optional[str] = None) -> Any:
        from moto.kms.models import kms_backends

        return kms_backends[self.account_id][region or self.region]

    def create_key(
        self, alias: Optional[str] = None, *, description: str = "", region: Optional[str] = None
    ) -> str:
        """A new symmetric ENCRYPT_DECRYPT key (in ``region``, default this emulator's);
        returns its ARN."""
        backend = self._backend(region)
        key = backend.create_key(
            None,
            "ENCRYPT_DECRYPT",
            "SYMMETRIC_DEFAULT",
            description or "encryptrootfs emulator key",
            None,
        )
        if alias is not None:
            backend.create_alias(key.id, alias if alias.startswith("alias/") else f"alias/{alias}")
        return str(key.arn)

    def key_arn(self, alias: str, region: Optional[str] = None) -> str:
        """The ARN of the key ``alias`` names (created earlier by :meth:`create_key`)."""
        backend = self._backend(region)
        name = alias if alias.startswith("alias/") else f"alias/{alias}"
        key_id = backend.get_key_id_from_alias(name)
        if key_id is None:
            raise KeyError(f"no key has the alias {name}")
        return str(backend.describe_key(key_id).arn)

    def disable_key(self, key_id: str) -> None:
        backend = self._backend()
        backend.disable_key(backend.any_id_to_key_id(key_id))

    def enable_key(self, key_id: str) -> None:
        backend = self._backend()
        backend.enable_key(backend.any_id_to_key_id(key_id))

    def schedule_deletion(self, key_id: str, days: int = 7) -> None:
        backend = self._backend()
        backend.schedule_key_deletion(backend.any_id_to_key_id(key_id), days)

    def key_state(self, key_id: str) -> str:
        backend = self._backend()
        return str(backend.keys[backend.any_id_to_key_id(key_id)].key_state)

    # -- faults ---------------------------------------------------------------------------

    def inject(
        self,
        action: Optional[str],
        error_code: str,
        times: int = 1,
        message: Optional[str] = None,
        *,
        status: int = 400,
    ) -> None:
        """Answer the next ``times`` requests for ``action`` (None: any) with ``error_code``.

        AWS sends ThrottlingException with HTTP 400, which is what botocore's standard retry
        mode recognises by code, not by status.
        """
        with self._lock:
            self._injections.append(
                _Injection(action, error_code, times, message or f"injected {error_code}", status)
            )

    def deny(self, action: Optional[str] = None) -> None:
        """AccessDeniedException for ``action`` (None: every action) until clear_faults()."""
        with self._lock:
            if self._denied is None:
                self._denied = set()
            self._denied.add(action)

    def throttle(self, rate_per_s: float, burst: int) -> None:
        """A token bucket in front of every request; over the rate -> ThrottlingException."""
        with self._lock:
            self._bucket = _TokenBucket(rate_per_s, burst)

    def trust_instance(self, imds: Any) -> None:
        """Requests signed with ``imds``'s role credentials come from its instance: the policy
        sees ``aws:PrincipalArn`` = the role and ``ec2:SourceInstanceARN`` = the instance, as
        AWS derives them from instance-role credentials. ``imds`` is an ImdsEmulator."""
        region, account, instance = imds.region, imds.account_id, imds.instance_id
        role = f"arn:aws:iam::{account}:role/{imds.role_name}"
        arn = f"arn:aws:ec2:{region}:{account}:instance/{instance}"
        with self._lock:
            self._instances[str(imds.access_key_id)] = (role, arn)

    def clear_faults(self) -> None:
        with self._lock:
            self._injections.clear()
            self._denied = None
            self._bucket = None

    # -- log ------------------------------------------------------------------------------

    def requests_for(self, action: str) -> list[KmsRequest]:
        with self._lock:
            return [r for r in self.requests if r.action == action]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- the middleware -------------------------------------------------------------------

    def _middleware(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self.account_id
        target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
        action = target.split(".", 1)[1] if "." in target else target
        params = _json_object(body)
        blob_key = _key_in_ciphertext(params.get("CiphertextBlob"))
        named_key = params.get("KeyId") if isinstance(params.get("KeyId"), str) else None
        key_id = named_key or blob_key
        raw_context = params.get("EncryptionContext")
        context = (
            {str(k): str(v) for k, v in raw_context.items()}
            if isinstance(raw_context, dict)
            else {}
        )
        scope = _CREDENTIAL_SCOPE.search(str(environ.get("HTTP_AUTHORIZATION", "")))
        region = scope.group(1) if scope else self.region

        access_key = _ACCESS_KEY.search(str(environ.get("HTTP_AUTHORIZATION", "")))
        fault = (
            self._clock_fault(str(environ.get("HTTP_X_AMZ_DATE", "")))
            or self._policy_fault(action, access_key.group(1) if access_key else "", context)
            or self._fault_for(action, key_id, region)
            or self._wrong_key_fault(action, named_key, blob_key, region)
        )
        if fault is not None:
            status, code, message = fault
            payload = json.dumps({"__type": code, "message": message}).encode()
            self._record(action, key_id, context, status, code, region)
            start_response(
                f"{status} {'Bad Request' if status == 400 else 'Error'}",
                [
                    ("Content-Type", "application/x-amz-json-1.1"),
                    ("Content-Length", str(len(payload))),
                    ("x-amzn-RequestId", str(uuid.uuid4())),
                ],
            )
            return [payload]

        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"] = int(status.split(" ", 1)[0])
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        assert self._app is not None
        chunks = self._app(environ, capture)
        try:
            response = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        status = int(captured.get("status", 500))
        error_code: Optional[str] = None
        if status >= 400:
            err = _json_object(response)
            error_code = str(err.get("__type") or err.get("Code") or err.get("code") or "Unknown")
        self._record(action, key_id, context, status, error_code, region)
        return [response]

    def _fault_for(
        self, action: str, key_id: Optional[str], region: str
    ) -> Optional[tuple[int, str, str]]:
        with self._lock:
            if self._denied is not None and (None in self._denied or action in self._denied):
                return (
                    400,
                    "AccessDeniedException",
                    f"User: arn:aws:sts::{self.account_id}:assumed-role/emulated/i-0 is not "
                    f"authorized to perform: kms:{action} on resource: {key_id or '*'} because "
                    "no identity-based policy allows the action",
                )
            for injection in self._injections:
                if injection.action is None or injection.action == action:
                    injection.times -= 1
                    if injection.times <= 0:
                        self._injections.remove(injection)
                    return injection.status, injection.error_code, injection.message
            if self._bucket is not None and not self._bucket.take():
                return 400, "ThrottlingException", "Rate exceeded"
        if action in _DATA_PLANE and key_id is not None:
            return self._key_state_fault(key_id, region)
        return None

    def _policy_fault(
        self, action: str, access_key: str, context: Mapping[str, str]
    ) -> Optional[tuple[int, str, str]]:
        """AccessDeniedException when the key policy does not allow this caller and context."""
        policy = self.key_policy
        if policy is None or action not in _DATA_PLANE:
            return None
        with self._lock:
            role, instance = self._instances.get(access_key, ("", ""))
        keys = {"aws:PrincipalArn": role}
        if instance:
            keys["ec2:SourceInstanceARN"] = instance
        facts = KmsRequestFacts(f"kms:{action}", role, dict(context), keys)
        if allows(policy, facts):
            return None
        return (
            400,
            "AccessDeniedException",
            f"User: {role or 'unknown'} is not authorized to perform: kms:{action} because the "
            "key policy does not allow it (emulated key policy)",
        )

    def _clock_fault(self, amz_date: str) -> Optional[tuple[int, str, str]]:
        """AWS's answer to a signature dated too far from now (a machine with a wrong clock)."""
        skew = self.max_clock_skew_s
        try:
            signed = calendar.timegm(time.strptime(amz_date, _AMZ_DATE))
        except ValueError:
            return None
        now = time.time() + self.clock_offset_s
        if skew is None or abs(signed - now) <= skew:
            return None
        minutes = f"{skew / 60:g} min."
        if signed < now:
            limit = time.strftime(_AMZ_DATE, time.gmtime(now - skew))
            return (
                400,
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than {limit} "
                f"({time.strftime(_AMZ_DATE, time.gmtime(now))} - {minutes})",
            )
        limit = time.strftime(_AMZ_DATE, time.gmtime(now + skew))
        return (
            400,
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date} is still later than {limit} "
            f"({time.strftime(_AMZ_DATE, time.gmtime(now))} + {minutes})",
        )

    def _wrong_key_fault(
        self, action: str, key_id: Optional[str], blob_key: Optional[str], region: str
    ) -> Optional[tuple[int, str, str]]:
        """Decrypt naming one key for a ciphertext of another: AWS says IncorrectKeyException
        (moto says AccessDeniedException)."""
        if action != "Decrypt" or key_id is None or blob_key is None:
            return None
        try:
            named = self._backend(region).any_id_to_key_id(key_id)
        except Exception:
            return None
        if named == blob_key:
            return None
        return (
            400,
            "IncorrectKeyException",
            "The key ID in the request does not identify a CMK that can perform this operation.",
        )

    def _key_state_fault(self, key_id: str, region: str) -> Optional[tuple[int, str, str]]:
        """What AWS answers for a key that is disabled or pending deletion (moto ignores it)."""
        try:
            backend = self._backend(region)
            key = backend.keys.get(backend.any_id_to_key_id(key_id))
        except Exception:
            return None
        if key is None:
            return None
        if key.key_state == "Disabled":
            return 400, "DisabledException", f"{key.arn} is disabled."
        if key.key_state == "PendingDeletion":
            return 400, "KMSInvalidStateException", f"{key.arn} is pending deletion."
        return None

    def _arn_of(self, key_id: Optional[str], region: str) -> Optional[str]:
        if key_id is None:
            return None
        try:
            backend = self._backend(region)
            key = backend.keys.get(backend.any_id_to_key_id(key_id))
        except Exception:
            return None
        return None if key is None else str(key.arn)

    def _record(
        self,
        action: str,
        key_id: Optional[str],
        context: Mapping[str, str],
        status: int,
        code: Optional[str],
        region: str,
    ) -> None:
        frozen = MappingProxyType(dict(context))
        entry = KmsRequest(
            time.time(), action, key_id, frozen, status, code, region, self._arn_of(key_id, region)
        )
        with self._lock:
            self.requests.append(entry)


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _key_in_ciphertext(blob: Any) -> Optional[str]:
    if not isinstance(blob, str):
        return None
    try:
        raw = base64.b64decode(blob, validate=True)[:_KEY_UUID_BYTES]
        return str(uuid.UUID(raw.decode("ascii")))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
