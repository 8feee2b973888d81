"""AWS KMS key provider: GenerateDataKey wraps, Decrypt unwraps, through botocore.

botocore does SigV4, the credential chain (in practice the instance role through IMDSv2) and
standard-mode retries; this module adds what early boot needs on top: an IMDS retry budget
(botocore's default is one 1 s attempt), the region from IMDS (botocore never looks it up), an
overall time budget for each call, and a sentence for every failure. botocore is imported here
only, when a key is actually wrapped or unwrapped.

The session is built explicitly from the configuration; the process environment is never
modified. Plaintext key bytes are copied into a bytearray at once; botocore's own ``bytes``
copy cannot be overwritten from Python and is dropped immediately.
"""

from __future__ import annotations

import calendar
import hmac
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .. import __version__
from ..config import AwsKmsConfig
from ..errors import KeyServiceError
from ..log import get_logger
from .base import (
    CONTEXT_INSTANCE_ARN,
    CONTEXT_INSTANCE_ID,
    CONTEXT_LUKS_UUID,
    VOLUME_KEY_BYTES,
    NewKey,
    ProviderCheck,
    ProviderName,
    WrappedKey,
    instance_arn,
    parse_key_arn,
    wipe,
)
from .imds import ImdsClient, ImdsError

log = get_logger("aws_kms")

_THROTTLING = frozenset(
    {"ThrottlingException", "Throttling", "RequestLimitExceeded", "TooManyRequestsException"}
)
_CLOCK = frozenset({"RequestExpired", "RequestTimeTooSkewed", "InvalidSignatureException"})
_BAD_CREDENTIALS = frozenset(
    {"UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException"}
)
_SERVICE_SIDE = frozenset(
    {"KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException"}
)
_NOTHING_CHANGED = "nothing was changed on disk"

_CREDENTIAL_SOURCES = {
    "iam-role": "iam-role via IMDSv2",
    "env": "environment variables",
    "shared-credentials-file": "shared credentials file",
    "config-file": "AWS config file",
    "assume-role": "assumed role (AWS config file)",
    "assume-role-with-web-identity": "web identity token",
    "container-role": "container credentials endpoint",
    "sso": "AWS SSO",
    "custom-process": "credential_process",
}


@dataclass(frozen=True)
class KmsEndpoint:
    """Where a region's KMS requests go, and which setting chose that address."""

    url: Optional[str]  # None: botocore's endpoint rules for the region
    setting: str  # e.g. providers.aws_kms.endpoints.eu-west-1; "" for botocore's rules


def kms_endpoint(config: AwsKmsConfig, region: str) -> KmsEndpoint:
    """The endpoint of KMS in ``region``: ``endpoints[region]``, else ``endpoint_url``, else
    botocore's rules. Every KMS client is made through this, so a wrapped copy in a second
    region goes to that region's URL (a VPC endpoint without private DNS serves one region)."""
    url = config.endpoints.get(region)
    if url is not None:
        return KmsEndpoint(url, f"providers.aws_kms.endpoints.{region}")
    if config.endpoint_url is not None:
        return KmsEndpoint(config.endpoint_url, "providers.aws_kms.endpoint_url")
    return KmsEndpoint(None, "")


@dataclass(frozen=True)
class KmsCall:
    """What a KMS call was trying to do; enough to explain its failure."""

    operation: str  # GenerateDataKey, Decrypt
    key_id: str
    region: str
    endpoint: str
    max_attempts: int
    total_timeout: float
    endpoint_setting: str = ""  # the setting that chose ``endpoint``; "": botocore's rules


def _endpoint_origin(call: KmsCall) -> str:
    """Where ``call.endpoint`` came from, for hints."""
    if call.endpoint_setting:
        return f"{call.endpoint} is set by {call.endpoint_setting}"
    return (
        f"{call.endpoint} is botocore's address for {call.region} "
        f"(providers.aws_kms.endpoints.{call.region} or endpoint_url can name another)"
    )


class _OutOfTime(Exception):
    """The call's total time budget ran out before another attempt could start."""


@dataclass(frozen=True)
class Tries:
    """How a call's retries ended: for a message that names the limit that was reached."""

    attempts: int  # attempts made
    seconds: float  # from the first attempt to the end
    out_of_time: bool  # the time budget, not the attempt count, stopped the retries


def _throttled(op: str, call: KmsCall, tries: Optional[Tries]) -> str:
    if tries is None:
        budget = f"{call.max_attempts} attempts within {call.total_timeout:g} s"
        return f"KMS kept throttling {op} past the retry budget ({budget})."
    if tries.out_of_time:
        return (
            f"KMS kept throttling {op}: {tries.attempts} attempts in {tries.seconds:.1f} s, and "
            f"the time budget (providers.aws_kms.total_timeout = {call.total_timeout:g} s) "
            "left no time for another."
        )
    return (
        f"KMS kept throttling {op}: all {call.max_attempts} attempts allowed "
        f"(providers.aws_kms.max_attempts) were used, in {tries.seconds:.1f} s of the "
        f"{call.total_timeout:g} s time budget."
    )


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _service_time(aws_message: str) -> str:
    """ ", KMS says <time>" from a signature-time error, which ends with AWS's own clock in
    parentheses ("... (20261128T081000Z - 5 min.)"); only the timestamp is taken, never the
    service's text."""
    stamps = re.findall(r"\b(\d{8}T\d{6}Z)\b", aws_message)
    if len(stamps) < 3:
        return ""
    try:
        return f", KMS says {_utc(calendar.timegm(time.strptime(stamps[2], '%Y%m%dT%H%M%SZ')))}"
    except ValueError:
        return ""


def explain_kms_error(
    error: BaseException, call: KmsCall, tries: Optional[Tries] = None
) -> KeyServiceError:
    """A sentence for a botocore failure of ``call``; never contains key material.

    ``tries`` (how the retries ended) lets a throttling message name the limit reached."""
    from botocore import exceptions as bx

    key, op = call.key_id, call.operation
    budget = f"{call.max_attempts} attempts within {call.total_timeout:g} s"
    if isinstance(error, bx.ClientError):
        err = error.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        aws_message = _short(str(err.get("Message", "")))
        if code == "AccessDeniedException":
            return KeyServiceError(
                f"KMS denied {op} on {key} in {call.region}: {aws_message}",
                hint=f"check that the key policy and the instance role's IAM policy allow kms:{op} "
                "for this role, including any kms:EncryptionContext conditions; "
                + _NOTHING_CHANGED,
            )
        if code == "DisabledException":
            return KeyServiceError(
                f"KMS refused {op}: the key {key} is disabled.",
                hint=f"enable it (aws kms enable-key --key-id {key}); " + _NOTHING_CHANGED,
            )
        if code == "KMSInvalidStateException":
            return KeyServiceError(
                f"KMS refused {op}: the key {key} is pending deletion or in another state that "
                "forbids it.",
                hint="if deletion is scheduled, cancel it (aws kms cancel-key-deletion) and enable "
                "the key; " + _NOTHING_CHANGED,
            )
        if code == "InvalidCiphertextException":
            return KeyServiceError(
                "KMS could not decrypt the wrapped key: the ciphertext or its encryption context "
                "does not match, so the token does not belong to this volume or was altered.",
                hint="compare the token's encryption context with this volume's LUKS UUID "
                "(encryptrootfs token show); " + _NOTHING_CHANGED,
            )
        if code == "IncorrectKeyException":
            return KeyServiceError(
                f"KMS says the wrapped key was not encrypted under {key}: the token names the "
                "wrong key or was altered.",
                hint=_NOTHING_CHANGED,
            )
        if code == "NotFoundException":
            return KeyServiceError(
                f"KMS has no key {key} in {call.region} (as seen by this account).",
                hint="check key_id, the region and that the key lives in this account; "
                + _NOTHING_CHANGED,
            )
        if code == "InvalidKeyUsageException":
            return KeyServiceError(
                f"the KMS key {key} cannot wrap data keys (it is not a symmetric "
                "ENCRYPT_DECRYPT key).",
                hint="use a symmetric encryption key; " + _NOTHING_CHANGED,
            )
        if code in _THROTTLING:
            return KeyServiceError(
                _throttled(op, call, tries),
                hint="raise providers.aws_kms.total_timeout / max_attempts or the account's KMS "
                "request quota; " + _NOTHING_CHANGED,
                retryable=True,
            )
        if code in _CLOCK or "signature expired" in aws_message.lower():
            return KeyServiceError(
                f"KMS rejected the request signature for {op} ({code}): the clock of this "
                f"machine is probably wrong (it says {_utc(time.time())}"
                f"{_service_time(aws_message)}).",
                hint="check the system time (date -u; an RTC or NTP problem) and retry; "
                + _NOTHING_CHANGED,
            )
        if code in _BAD_CREDENTIALS:
            return KeyServiceError(
                f"KMS did not accept the AWS credentials ({code}): they are invalid or expired.",
                hint="check the instance role and the system time; " + _NOTHING_CHANGED,
            )
        if code in _SERVICE_SIDE:
            return KeyServiceError(
                f"KMS failed internally on {op} ({code}) after {budget}.",
                hint="retry later (see the AWS health dashboard); " + _NOTHING_CHANGED,
                retryable=True,
            )
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return KeyServiceError(
            f"KMS {op} on {key} failed: {code}: {aws_message}",
            hint=_NOTHING_CHANGED,
            retryable=isinstance(status, int) and status >= 500,
        )
    if isinstance(error, _OutOfTime):
        return KeyServiceError(
            f"gave up on KMS {op} after the total time budget ({budget}); {error}",
            hint="check the network path to KMS, or raise providers.aws_kms.total_timeout; "
            + _NOTHING_CHANGED,
            retryable=True,
        )
    if isinstance(error, bx.NoCredentialsError):
        return KeyServiceError(
            "no AWS credentials were found (environment, config files, instance role).",
            hint="attach an instance profile with kms permissions and make sure IMDSv2 answers; "
            + _NOTHING_CHANGED,
            retryable=True,
        )
    if isinstance(error, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return KeyServiceError(
            f"could not reach KMS at {call.endpoint} ({budget}).",
            hint="check the network in this boot stage, DNS, routes, security groups and any "
            f"VPC endpoint; {_endpoint_origin(call)}; " + _NOTHING_CHANGED,
            retryable=True,
        )
    if isinstance(error, bx.ReadTimeoutError):
        return KeyServiceError(
            f"KMS at {call.endpoint} did not answer {op} in time ({budget}).",
            hint="raise providers.aws_kms.read_timeout or check the network; " + _NOTHING_CHANGED,
            retryable=True,
        )
    if isinstance(error, (bx.SSLError, bx.ConnectionClosedError, bx.HTTPClientError)):
        return KeyServiceError(
            f"the connection to KMS at {call.endpoint} failed during {op}: {type(error).__name__}.",
            hint="check the clock (TLS certificates), proxies and the endpoint "
            f"({_endpoint_origin(call)}); " + _NOTHING_CHANGED,
            retryable=True,
        )
    return KeyServiceError(
        f"KMS {op} failed: {type(error).__name__}: {_short(str(error))}", hint=_NOTHING_CHANGED
    )


def _not_the_configured_key(configured: str, region: str, returned: str) -> str:
    """Why ``returned`` (the KeyId KMS reports) is not the key ``configured`` names, or "".

    A key ARN must come back as itself; a key id as the ARN of that id; an alias (which may be
    repointed) as a key of the alias's account, or of the region called when only the name is
    configured. A spoofed endpoint or a repointed alias thus cannot wrap new roots under a key
    of another account."""
    got = parse_key_arn(returned)
    if got is None or not got.resource.startswith("key/"):
        return "KMS must report a key ARN"
    if got.region != region:
        return f"it lives in {got.region}, and the call went to {region}"
    want = parse_key_arn(configured)
    if want is not None:
        if want.account != got.account:
            return f"it belongs to the account {got.account}, not {want.account}"
        if want.resource.startswith("key/") and want.resource != got.resource:
            return "it is another key"
        return ""
    if not configured.startswith("alias/") and got.resource != f"key/{configured}":
        return "it is another key"
    return ""


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AwsKmsProvider:
    """The ``aws-kms`` provider; see :class:`encryptrootfs.providers.base.KeyProvider`."""

    name = ProviderName.AWS_KMS

    def __init__(self, config: AwsKmsConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._session: Any = None
        self._credential_source: Optional[str] = None
        self._clients: dict[str, Any] = {}  # region -> botocore KMS client

    # -- the contract ---------------------------------------------------------------------

    def new_key(self, luks_uuid: str) -> NewKey:
        if not luks_uuid:
            raise ValueError("luks_uuid must not be empty")
        deadline = self._clock() + self.config.total_timeout
        imds = self._imds(deadline)
        region, _ = self._region(imds)
        context = self._context(imds, {CONTEXT_LUKS_UUID: luks_uuid})
        plaintext, wrapped = self._generate(region, context, deadline)
        return NewKey(plaintext=plaintext, wrapped=wrapped)

    def unwrap(self, wrapped: WrappedKey) -> bytearray:
        if wrapped.provider is not ProviderName.AWS_KMS:
            raise ValueError(f"not an aws-kms key: {wrapped.provider}")
        deadline = self._clock() + self.config.total_timeout
        bound_to = {
            name: wrapped.encryption_context[name]
            for name in (CONTEXT_INSTANCE_ID, CONTEXT_INSTANCE_ARN)
            if name in wrapped.encryption_context
        }
        if bound_to:
            self._refuse_other_instance(bound_to, self._imds(deadline))
        # The region comes from the token: the key lives where it was when the key was wrapped.
        return self._decrypt(
            wrapped.region, wrapped.key_id, wrapped.ciphertext, wrapped.encryption_context, deadline
        )

    def wrap(
        self, plaintext: bytes | bytearray, encryption_context: Mapping[str, str]
    ) -> WrappedKey:
        """KMS Encrypt of a key that already exists, under the configured key and region.

        Used to re-wrap (``encryptrootfs rewrap``) or copy a token's key for another key or
        region; the context is passed as given (the token's own), so a key policy that
        trusts the ``encryptrootfs:`` pairs keeps matching.
        """
        if len(plaintext) != VOLUME_KEY_BYTES:
            raise ValueError(f"a wrapped key must be {VOLUME_KEY_BYTES} bytes")
        deadline = self._clock() + self.config.total_timeout
        region, _ = self._region(self._imds(deadline))
        client = self._client(region, deadline)
        call = self._call("Encrypt", self.config.key_id, region, client)
        response = self._with_budget(
            client,
            call,
            deadline,
            lambda: client.encrypt(
                KeyId=self.config.key_id,
                Plaintext=bytes(plaintext),
                EncryptionContext=dict(encryption_context),
            ),
        )
        return WrappedKey(
            provider=ProviderName.AWS_KMS,
            key_id=str(response["KeyId"]),
            region=region,
            ciphertext=bytes(response["CiphertextBlob"]),
            encryption_context=encryption_context,
        )

    def check(self) -> ProviderCheck:
        deadline = self._clock() + self.config.total_timeout
        imds = self._imds(deadline)
        region, region_source = self._region(imds)
        client = self._client(region, deadline)
        context = self._context(imds, {"encryptrootfs:purpose": "kms-check"})
        endpoint = str(client.meta.endpoint_url)
        key_arn: Optional[str] = None
        try:
            plaintext, wrapped = self._generate(region, context, deadline, client=client)
            key_arn = wrapped.key_id
            try:
                again = self._decrypt(
                    region, wrapped.key_id, wrapped.ciphertext, context, deadline, client=client
                )
                same = hmac.compare_digest(again, plaintext)
                wipe(again)
            finally:
                wipe(plaintext)
        except KeyServiceError as e:
            return ProviderCheck(
                provider=self.name,
                credential_source=self._credential_source or "unknown",
                region=region,
                region_source=region_source,
                endpoint=endpoint,
                key_arn=key_arn,
                round_trip_ok=False,
                round_trip_error=str(e),
            )
        return ProviderCheck(
            provider=self.name,
            credential_source=self._credential_source or "unknown",
            region=region,
            region_source=region_source,
            endpoint=endpoint,
            key_arn=key_arn,
            round_trip_ok=same,
            round_trip_error=None if same else "Decrypt returned different bytes",
        )

    # -- KMS calls ------------------------------------------------------------------------

    def _generate(
        self,
        region: str,
        context: Mapping[str, str],
        deadline: float,
        *,
        client: Any = None,
    ) -> tuple[bytearray, WrappedKey]:
        client = client or self._client(region, deadline)
        call = self._call("GenerateDataKey", self.config.key_id, region, client)
        response = self._with_budget(
            client,
            call,
            deadline,
            lambda: client.generate_data_key(
                KeyId=self.config.key_id,
                NumberOfBytes=VOLUME_KEY_BYTES,
                EncryptionContext=dict(context),
            ),
        )
        plaintext = bytearray(response.pop("Plaintext"))
        if len(plaintext) != VOLUME_KEY_BYTES:
            wipe(plaintext)
            raise KeyServiceError(
                f"KMS returned a {len(plaintext)}-byte data key instead of {VOLUME_KEY_BYTES}.",
                hint=f"check that AWS KMS answers there ({_endpoint_origin(call)}); "
                + _NOTHING_CHANGED,
            )
        returned = str(response.get("KeyId", ""))
        foreign = _not_the_configured_key(self.config.key_id, region, returned)
        if foreign:
            wipe(plaintext)
            raise KeyServiceError(
                f"KMS answered GenerateDataKey with the key {returned or '(none)'}, which is not "
                f"the configured key {self.config.key_id}: {foreign}.",
                hint="if key_id is an alias, check where it points (aws kms list-aliases); "
                f"check the endpoint ({_endpoint_origin(call)}); " + _NOTHING_CHANGED,
            )
        wrapped = WrappedKey(
            provider=ProviderName.AWS_KMS,
            key_id=returned,
            region=region,
            ciphertext=bytes(response["CiphertextBlob"]),
            encryption_context=context,
        )
        return plaintext, wrapped

    def _decrypt(
        self,
        region: str,
        key_id: str,
        ciphertext: bytes,
        context: Mapping[str, str],
        deadline: float,
        *,
        client: Any = None,
    ) -> bytearray:
        client = client or self._client(region, deadline)
        call = self._call("Decrypt", key_id, region, client)
        response = self._with_budget(
            client,
            call,
            deadline,
            lambda: client.decrypt(
                KeyId=key_id, CiphertextBlob=ciphertext, EncryptionContext=dict(context)
            ),
        )
        return bytearray(response.pop("Plaintext"))

    def _call(self, operation: str, key_id: str, region: str, client: Any) -> KmsCall:
        return KmsCall(
            operation=operation,
            key_id=key_id,
            region=region,
            endpoint=str(client.meta.endpoint_url),
            max_attempts=self.config.max_attempts,
            total_timeout=self.config.total_timeout,
            endpoint_setting=kms_endpoint(self.config, region).setting,
        )

    def _with_budget(
        self, client: Any, call: KmsCall, deadline: float, request: Callable[[], Any]
    ) -> dict[str, Any]:
        """Run ``request`` so that no retry starts that could end after ``deadline``.

        botocore's standard mode sleeps up to min(2**(n-1), 20) s after attempt n. The budget
        handler runs before botocore's own retry handler; returning False there stops the
        retries (botocore then raises the last real error, which is what the user should see).
        An attempt itself can last connect_timeout + read_timeout, so that is reserved too.
        """
        per_attempt = self.config.connect_timeout + self.config.read_timeout
        clock = self._clock
        started = clock()
        # Filled by the handler below, read once the call failed (the handler runs in this
        # thread, inside request()).
        seen = {"attempts": 0, "out_of_time": False}

        def budget(attempts: int, **_: Any) -> Optional[bool]:
            seen["attempts"] = attempts
            worst_sleep = min(2.0 ** (attempts - 1), 20.0)
            if clock() + worst_sleep + per_attempt > deadline:
                log.debug("%s: no retry after attempt %d: time budget", call.operation, attempts)
                seen["out_of_time"] = True
                return False
            return None

        def before_send(**_: Any) -> None:
            if clock() >= deadline:
                raise _OutOfTime("the deadline passed before the next attempt")

        events = client.meta.events
        events.register_first("needs-retry.kms", budget, unique_id="encryptrootfs-budget")
        events.register_first("before-send.kms", before_send, unique_id="encryptrootfs-deadline")
        from botocore import exceptions as bx

        try:
            response: dict[str, Any] = request()
            return response
        except (bx.BotoCoreError, bx.ClientError, _OutOfTime) as e:
            tries = Tries(
                attempts=int(seen["attempts"]),
                seconds=clock() - started,
                out_of_time=bool(seen["out_of_time"]) or isinstance(e, _OutOfTime),
            )
            raise explain_kms_error(e, call, tries if tries.attempts else None) from None
        finally:
            events.unregister("needs-retry.kms", unique_id="encryptrootfs-budget")
            events.unregister("before-send.kms", unique_id="encryptrootfs-deadline")

    # -- session, credentials, region -----------------------------------------------------

    def _imds(self, deadline: float) -> ImdsClient:
        return ImdsClient(
            self.config.imds_endpoint,
            timeout=self.config.imds_timeout,
            attempts=self.config.imds_attempts,
            deadline=deadline,
        )

    def _region(self, imds: ImdsClient) -> tuple[str, str]:
        region, source = self.config.region_and_source()
        if region is not None:
            return region, source
        try:
            return imds.region(), "IMDS placement/region"
        except ImdsError as e:
            raise KeyServiceError(
                f"no region configured and IMDS could not tell it: {e.message}",
                hint="set providers.aws_kms.region or use a key ARN; " + _NOTHING_CHANGED,
                retryable=e.retryable,
            ) from None

    def _context(self, imds: ImdsClient, base: Mapping[str, str]) -> dict[str, str]:
        context = dict(base)
        context.update(self.config.encryption_context)
        if self.config.bind_instance_id:
            context.update(self._this_instance(imds, "bind_instance_id is set but"))
        return context

    def _this_instance(self, imds: ImdsClient, why: str) -> dict[str, str]:
        """This instance's id and ARN, as the binding pairs of an encryption context."""
        try:
            doc = imds.identity_document()
        except ImdsError as e:
            raise KeyServiceError(
                f"{why} IMDS could not tell which instance this is: {e.message}",
                hint=_NOTHING_CHANGED,
                retryable=e.retryable,
            ) from None
        except ValueError:
            raise KeyServiceError(
                f"{why} the IMDS instance identity document is not valid JSON.",
                hint=_NOTHING_CHANGED,
                retryable=True,
            ) from None
        fields = {name: doc.get(name) for name in ("instanceId", "accountId", "region")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise KeyServiceError(
                f"{why} the IMDS instance identity document lacks instanceId, accountId or region.",
                hint=_NOTHING_CHANGED,
            )
        iid, account, region = (str(fields[n]) for n in ("instanceId", "accountId", "region"))
        return {CONTEXT_INSTANCE_ID: iid, CONTEXT_INSTANCE_ARN: instance_arn(region, account, iid)}

    def _refuse_other_instance(self, bound_to: Mapping[str, str], imds: ImdsClient) -> None:
        """A token bound to another instance is refused here, before any KMS request: a clear
        sentence early. The boundary itself is the key policy (kms:EncryptionContext:
        encryptrootfs:instance_arn must equal ${ec2:SourceInstanceARN}); this check only
        saves a denied request and names the cause."""
        here = self._this_instance(imds, "the token is bound to an instance, but")
        for name, value in bound_to.items():
            if here[name] != value:
                raise KeyServiceError(
                    f"this wrapped key is bound to the instance {value} ({name}), and this "
                    f"machine is {here[name]}: the disk was moved or copied from another "
                    "instance, so KMS was not asked.",
                    hint="boot the disk on its own instance, or open it with the recovery key "
                    "and enroll a token for this instance (encryptrootfs enroll); "
                    + _NOTHING_CHANGED,
                )

    def _botocore_session(self) -> Any:
        if self._session is None:
            import botocore.session

            session = botocore.session.Session()
            cfg = self.config
            # Early boot: the metadata service may answer late or fail once; botocore's
            # defaults (1 attempt, 1 s) would turn one hiccup into "no credentials".
            session.set_config_variable("metadata_service_num_attempts", cfg.imds_attempts)
            # botocore converts this one to int: round up, never down to 0.
            session.set_config_variable("metadata_service_timeout", math.ceil(cfg.imds_timeout))
            session.set_config_variable("ec2_metadata_service_endpoint", cfg.imds_endpoint + "/")
            # IMDSv2 only: a v1 fallback would hide "token refused" behind a vaguer failure.
            session.set_config_variable("ec2_metadata_v1_disabled", True)
            session.user_agent_extra = f"encryptrootfs/{__version__}"
            self._session = session
        return self._session

    def _credentials(self, deadline: float) -> Any:
        session = self._botocore_session()
        from botocore import exceptions as bx

        try:
            credentials = session.get_credentials()
        except bx.BotoCoreError as e:
            # e.g. MetadataRetrievalError when the token PUT is refused: ask IMDS why.
            raise self._no_credentials(deadline, _short(str(e))) from None
        if credentials is None:
            raise self._no_credentials(deadline, None)
        method = str(getattr(credentials, "method", "unknown"))
        source = _CREDENTIAL_SOURCES.get(method, method)
        if method == "iam-role":
            source = f"{source} ({self.config.imds_endpoint})"
        self._credential_source = source
        return credentials

    def _no_credentials(self, deadline: float, botocore_said: Optional[str]) -> KeyServiceError:
        """Why botocore found no credentials, asked of IMDS directly."""
        imds = self._imds(max(deadline, self._clock() + self.config.imds_timeout))
        hint = "attach an instance profile whose role may use the KMS key; " + _NOTHING_CHANGED
        try:
            role = imds.role_name()
        except ImdsError as e:
            return KeyServiceError(
                f"no AWS credentials: {e.message}", hint=e.hint or hint, retryable=e.retryable
            )
        if role is None:
            return KeyServiceError(
                "no AWS credentials: no IAM role is attached to this instance (IMDS lists none).",
                hint=hint,
            )
        detail = f" ({botocore_said})" if botocore_said else ""
        return KeyServiceError(
            f"no AWS credentials: IMDS lists the role {role!r} but botocore could not fetch "
            f"its credentials{detail}.",
            hint="retry; check the instance profile and IMDS options; " + _NOTHING_CHANGED,
            retryable=True,
        )

    def _client(self, region: str, deadline: float) -> Any:
        if region in self._clients:
            return self._clients[region]
        from botocore.config import Config as BotoConfig

        self._credentials(deadline)
        session = self._botocore_session()
        cfg = self.config
        url = kms_endpoint(cfg, region).url
        if url is not None and url.startswith("http://") and cfg.allow_insecure_http:
            log.warning(
                "KMS in %s at %s over plain http (providers.aws_kms.allow_insecure_http): the "
                "data key and the session token cross the network unencrypted",
                region,
                url,
            )
        client = session.create_client(
            "kms",
            region_name=region,
            endpoint_url=url,
            config=BotoConfig(
                connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout,
                retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
                user_agent_extra=f"encryptrootfs/{__version__}",
            ),
        )
        self._clients[region] = client
        return client
