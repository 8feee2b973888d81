"""The IMDSv2 emulator, and the product's IMDS client against it, over real HTTP."""

from __future__ import annotations

import http.client
import json
from datetime import datetime, timezone
from typing import Optional

import pytest

from encryptrootfs.providers.imds import ImdsClient, ImdsError
from encryptrootfs_lab.emulators import ImdsEmulator
from support.emulators import INSTANCE_ID, REGION

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def _raw(
    imds: ImdsEmulator, method: str, path: str, headers: Optional[dict[str, str]] = None
) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", imds.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _token(imds: ImdsEmulator, ttl: str = "60") -> str:
    status, token = _raw(imds, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200
    return token


@pytest.mark.parametrize(
    ("ttl", "status"),
    [(None, 400), ("0", 400), ("21601", 400), ("x", 400), ("1", 200), ("21600", 200)],
)
def test_token_ttl_is_enforced(imds: ImdsEmulator, ttl: Optional[str], status: int) -> None:
    headers = {} if ttl is None else {TTL: ttl}
    assert _raw(imds, "PUT", "/latest/api/token", headers)[0] == status


def test_v2_required_by_default(imds: ImdsEmulator) -> None:
    assert _raw(imds, "GET", "/latest/meta-data/instance-id")[0] == 401
    assert _raw(imds, "GET", "/latest/meta-data/instance-id", {TOKEN: "bogus"})[0] == 401
    token = _token(imds)
    assert _raw(imds, "GET", "/latest/meta-data/instance-id", {TOKEN: token}) == (200, INSTANCE_ID)
    imds.require_v2 = False
    assert _raw(imds, "GET", "/latest/meta-data/instance-id") == (200, INSTANCE_ID)


def test_expired_token_is_401_and_the_client_gets_a_new_one(imds: ImdsEmulator) -> None:
    client = ImdsClient(imds.url, timeout=2, attempts=2)
    assert client.region() == REGION
    imds.expire_tokens()
    assert client.instance_id() == INSTANCE_ID
    token_puts = [r for r in imds.requests if r.method == "PUT"]
    assert len(token_puts) == 2
    assert [r.status for r in imds.requests_to("/latest/meta-data/instance-id")] == [401, 200]


def test_disabled_answers_403_to_everything(imds: ImdsEmulator) -> None:
    imds.disabled = True
    assert _raw(imds, "PUT", "/latest/api/token", {TTL: "60"})[0] == 403
    assert _raw(imds, "GET", "/latest/meta-data/placement/region")[0] == 403
    with pytest.raises(ImdsError) as err:
        ImdsClient(imds.url, attempts=1).region()
    assert err.value.status == 403
    assert "disabled for this instance" in str(err.value)


def test_refuse_tokens(imds: ImdsEmulator) -> None:
    imds.refuse_tokens = True
    assert _raw(imds, "PUT", "/latest/api/token", {TTL: "60"})[0] == 403
    with pytest.raises(ImdsError, match="refused to issue an IMDSv2 session token"):
        ImdsClient(imds.url, attempts=1).region()


def test_fail_next_only_hits_its_path_and_the_client_retries(imds: ImdsEmulator) -> None:
    imds.fail_next(503, times=2, path_prefix="/latest/meta-data/placement/")
    token = _token(imds)  # not under the prefix: unaffected
    assert _raw(imds, "GET", "/latest/meta-data/instance-id", {TOKEN: token})[0] == 200
    client = ImdsClient(imds.url, timeout=2, attempts=3, sleep=lambda _s: None)
    assert client.region() == REGION
    statuses = [r.status for r in imds.requests_to("/latest/meta-data/placement/region")]
    assert statuses == [503, 503, 200]


def test_client_gives_up_after_its_attempts(imds: ImdsEmulator) -> None:
    imds.fail_next(500, times=10, path_prefix="/latest/meta-data/placement/region")
    client = ImdsClient(imds.url, timeout=2, attempts=3, sleep=lambda _s: None)
    with pytest.raises(ImdsError) as err:
        client.region()
    assert err.value.status == 500
    assert "kept failing" in str(err.value)
    assert len(imds.requests_to("/latest/meta-data/placement/region")) == 3


def test_client_on_a_silent_or_absent_service(imds: ImdsEmulator) -> None:
    imds.delay_s = 0.5
    with pytest.raises(ImdsError, match="timed out"):
        ImdsClient(imds.url, timeout=0.1, attempts=2, sleep=lambda _s: None).region()
    url = imds.url
    imds.stop()
    with pytest.raises(ImdsError, match="connection refused"):
        ImdsClient(url, timeout=0.5, attempts=2, sleep=lambda _s: None).region()


def test_role_credentials_and_documents(imds: ImdsEmulator) -> None:
    headers = {TOKEN: _token(imds)}
    status, role = _raw(imds, "GET", "/latest/meta-data/iam/security-credentials/", headers)
    assert (status, role) == (200, imds.role_name)
    status, body = _raw(imds, "GET", f"/latest/meta-data/iam/security-credentials/{role}", headers)
    creds = json.loads(body)
    assert creds["AccessKeyId"] == imds.access_key_id and creds["Token"] == imds.session_token
    expiration = datetime.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    assert expiration.replace(tzinfo=timezone.utc) > datetime.now(timezone.utc)
    other = "/latest/meta-data/iam/security-credentials/other-role"
    assert _raw(imds, "GET", other, headers)[0] == 404
    info = json.loads(_raw(imds, "GET", "/latest/meta-data/iam/info", headers)[1])
    assert info["InstanceProfileArn"].endswith(f"instance-profile/{role}")
    doc = ImdsClient(imds.url).identity_document()
    assert (doc["region"], doc["instanceId"], doc["accountId"]) == (
        REGION,
        INSTANCE_ID,
        imds.account_id,
    )


def test_no_role_attached(imds: ImdsEmulator) -> None:
    imds.role_name = None
    assert ImdsClient(imds.url).role_name() is None


def test_log_never_holds_the_token(imds: ImdsEmulator) -> None:
    token = _token(imds)
    _raw(imds, "GET", "/latest/meta-data/instance-id", {TOKEN: token})
    assert [(r.method, r.status, r.had_token) for r in imds.requests] == [
        ("PUT", 200, False),
        ("GET", 200, True),
    ]
    assert token not in repr(imds.requests)


def test_restart_keeps_the_port(imds: ImdsEmulator) -> None:
    port = imds.port
    with imds.paused(), pytest.raises(OSError):
        _raw(imds, "GET", "/latest/meta-data/instance-id")
    assert imds.port == port
    assert _raw(imds, "GET", "/latest/meta-data/instance-id")[0] == 401
