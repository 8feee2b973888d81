"""Security logic written once, and every caller going through it.

- the token reader: a damaged encryptrootfs token is skipped and named the same way by the
  boot, ``status``, ``token show``, ``token verify`` and ``volumes``;
- the custody proof: a key service that unwraps to other bytes is refused by the first boot,
  enroll, a new copy and a data volume, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import cli, devices, luks2
from encryptrootfs.boot import first_boot
from encryptrootfs.errors import VerifyError
from encryptrootfs.ops import enroll, status, volumes
from encryptrootfs.providers.base import NewKey, ProviderName, WrappedKey
from encryptrootfs.token import KmsToken, read_tokens, token_to_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
GOOD = KmsToken(("0",), WrappedKey(ProviderName.AWS_KMS, ARN, "eu-west-1", b"c", {}))


def damaged_header() -> luks2.LuksHeader:
    """Token 0 good, token 1 ours but malformed, token 2 clevis's."""
    doc = json.loads((FIXTURES / "luks2" / "pbkdf2-fresh.json").read_text())
    doc["tokens"] = {
        "0": token_to_json(GOOD),
        "1": json.loads((FIXTURES / "tokens" / "malformed-ciphertext.json").read_text()),
        "2": json.loads((FIXTURES / "tokens" / "foreign-clevis.json").read_text()),
    }
    dump = (FIXTURES / "luks2" / "pbkdf2-fresh.dump.txt").read_text()
    return luks2.parse_header(json.dumps(doc), dump)


def test_a_damaged_token_is_skipped_and_named_alike_by_every_reader(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    header = damaged_header()
    (why,) = read_tokens(header.tokens).damaged
    assert why.startswith("token 1: ")

    # The boot: the good copy is kept, the damaged one named.
    monkeypatch.setattr(luks2, "read_header", lambda device, **kw: header)
    facts = devices.luks_facts("/dev/vda1")
    assert (facts.tokens, facts.damaged) == ((GOOD,), (why,))

    # status: listed as an encryptrootfs token with the same reason.
    (summary,) = [t for t in status.summarise_tokens(header) if t.id == 1]
    assert f"token 1: {summary.error}" == why

    # volumes: counted out, named, the good copy used.
    assert volumes.our_tokens("/dev/md127") == [GOOD]

    # token show: listed, skipped, named; the good token and the foreign one still shown.
    monkeypatch.setattr(enroll, "require_luks2", lambda device, header_path=None: header)
    assert cli.main(["token", "show", "/dev/vda1"]) == 0
    out = capsys.readouterr().out
    assert f"  {why} (damaged, skipped)" in out
    assert "  token 0: aws-kms key " in out and "  token 2: clevis (not ours, skipped)" in out

    # token verify: a failed result with the same reason, the good token verified.
    class Kms:
        def unwrap(self, wrapped: WrappedKey) -> bytearray:
            return bytearray(b"k" * 64)

    monkeypatch.setattr(luks2, "test_keyslot", lambda *a, **k: True)
    results = enroll.verify("/dev/vda1", Kms())  # type: ignore[arg-type]
    assert [(r.token_id, r.ok) for r in results] == [(0, True), (1, False)]
    assert results[1].reason == why


class Lying:
    """A key service that unwraps every key to other bytes (a wrong endpoint, a proxy)."""

    name = ProviderName.AWS_KMS

    def __init__(self) -> None:
        self.made: list[NewKey] = []

    def new_key(self, luks_uuid: str) -> NewKey:
        new = NewKey(bytearray(b"n" * 64), WrappedKey(self.name, ARN, "eu-west-1", b"w", {}))
        self.made.append(new)
        return new

    def wrap(self, plaintext: Any, encryption_context: Any) -> WrappedKey:
        return WrappedKey(self.name, ARN, "eu-west-1", b"w", dict(encryption_context))

    def unwrap(self, wrapped: WrappedKey) -> bytearray:
        return bytearray(b"x" * 64)


def test_the_custody_proof_refuses_a_key_service_that_unwraps_to_other_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def nothing_written(*a: Any, **k: Any) -> Any:
        raise AssertionError("written after a failed custody proof")

    for name in ("add_keyslot", "import_token", "test_keyslot"):
        monkeypatch.setattr(luks2, name, nothing_written)
    monkeypatch.setattr(volumes, "luks_format", nothing_written)

    kms = Lying()
    with pytest.raises(VerifyError, match="different key on unwrap; nothing was changed"):
        first_boot.verified_new_key(kms, "u")  # type: ignore[arg-type]

    header = damaged_header()
    monkeypatch.setattr(enroll, "require_luks2", lambda device, path=None: header)
    monkeypatch.setattr(luks2, "test_any_keyslot", lambda *a, **k: True)
    with pytest.raises(VerifyError, match="nothing was changed on /dev/vdb"):
        enroll.enroll("/dev/vdb", kms, bytearray(b"old"))  # type: ignore[arg-type]

    source = enroll.FoundToken(0, "encryptrootfs", GOOD)
    with pytest.raises(VerifyError, match="the new copy was not stored"):
        enroll.wrap_copy(bytearray(b"k" * 64), source, kms)  # type: ignore[arg-type]

    from encryptrootfs.config import parse_config

    config = parse_config(
        {
            "providers": {"aws_kms": {"key_id": ARN}},
            "volumes": [{"name": "data", "devices": ["/dev/vdc"], "mount": "/srv"}],
        },
        source="t",
    )
    with pytest.raises(VerifyError, match="nothing was written to /dev/vdc"):
        volumes.format_volume("/dev/vdc", config.volumes[0], kms)  # type: ignore[arg-type]
    # Every new key was wiped when the proof failed.
    assert kms.made and all(not any(new.plaintext) for new in kms.made)


def test_every_cryptsetup_call_goes_through_luks2_in_the_c_locale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Outside the luks2 package, nothing names the cryptsetup program.
    src = Path(luks2.__file__).resolve().parents[1]
    outside = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if "luks2" not in p.parts
        and p.name != "tools.py"  # the tool table: package names, not a call
        and ("CRYPTSETUP" in p.read_text() or '"cryptsetup",' in p.read_text())
    ]
    assert outside == []

    from encryptrootfs.luks2 import cryptsetup

    seen: list[tuple[list[str], Any]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> Any:
        seen.append((list(argv), kwargs.get("env")))
        raise AssertionError("stop here")

    monkeypatch.setattr(cryptsetup, "run", fake_run)
    for call in (
        lambda: luks2.read_dump("/dev/vdb"),
        lambda: luks2.set_label("/dev/vdb", "data", "encryptrootfs"),
        lambda: luks2.format_device(
            "/dev/vdb", bytearray(b"k"), uuid="u", label="l", subsystem="s"
        ),
    ):
        with pytest.raises(AssertionError):
            call()
    assert [argv[0] for argv, _ in seen] == ["cryptsetup"] * 3
    assert all(env == {"LC_ALL": "C", "LANG": "C"} for _, env in seen)
