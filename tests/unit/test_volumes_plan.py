"""Data volumes: the [[volumes]] schema, and the planners that decide format / unlock / refuse
from probed facts (pure functions; the unit tier runs no command)."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from encryptrootfs.config import (
    Raid,
    VolumeConfig,
    VolumeFilesystem,
    parse_config,
)
from encryptrootfs.errors import ConfigError, KeyServiceError
from encryptrootfs.ops.volumes import (
    FORMATTING_SUBSYSTEM,
    VOLUME_SUBSYSTEM,
    MemberProbe,
    MembersAction,
    MountEntry,
    TargetAction,
    TargetProbe,
    mounted_here,
    parse_mountinfo,
    plan_members,
    plan_target,
    unwrap_key,
)

ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
GLOB = "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*"
VOLUME: dict[str, Any] = {"name": "data", "devices": [GLOB], "raid": "raid0", "mount": "/data"}


def _config(*volumes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"providers": {"aws_kms": {"key_id": ARN}}, "volumes": list(volumes), **top}


def _volume(**changes: Any) -> dict[str, Any]:
    v = copy.deepcopy(VOLUME)
    for key, value in changes.items():
        if value is None:
            v.pop(key, None)
        else:
            v[key] = value
    return v


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="test.toml")
    return e.value.message


# --- config --------------------------------------------------------------------------------------


def test_no_volumes_is_the_default() -> None:
    assert parse_config({"providers": {"aws_kms": {"key_id": ARN}}}, source="t").volumes == ()


def test_a_volume_gets_the_documented_defaults() -> None:
    (v,) = parse_config(
        _config({"name": "scratch", "devices": ["/dev/nvme1n1"], "mount": "/scratch/"}), source="t"
    ).volumes
    assert v == VolumeConfig(
        name="scratch",
        devices=("/dev/nvme1n1",),
        mount="/scratch",
        raid=Raid.NONE,
        filesystem=VolumeFilesystem.EXT4,
        mapper_name="scratch",
        mount_options=(),
        optional=False,
    )


def test_every_field_is_read() -> None:
    (v,) = parse_config(
        _config(
            _volume(
                filesystem="xfs",
                mapper_name="nvme-data",
                mount_options=["noatime", "nodev"],
                optional=True,
                devices=[GLOB, "/dev/nvme9n1"],
            )
        ),
        source="t",
    ).volumes
    assert (v.raid, v.filesystem, v.mapper_name, v.mount_options, v.optional, v.devices) == (
        Raid.RAID0,
        VolumeFilesystem.XFS,
        "nvme-data",
        ("noatime", "nodev"),
        True,
        (GLOB, "/dev/nvme9n1"),
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_config(**{}) | {"volumes": {"name": "x"}}, "volumes: must be an array of tables"),
        (_config(_volume(name=None)), "volumes[0].name: missing"),
        (_config(_volume(name="my data")), "volumes[0].name: must be 1-32 characters"),
        (_config(_volume(devices=None)), "volumes[0].devices: missing"),
        (_config(_volume(devices=[])), "volumes[0].devices: must be a non-empty list"),
        (_config(_volume(devices="/dev/nvme1n1")), "volumes[0].devices: must be a non-empty list"),
        (_config(_volume(devices=[GLOB, 3])), "volumes[0].devices[1]: must be a string"),
        (
            _config(_volume(devices=["nvme1n1"])),
            "volumes[0].devices[0]: must be an absolute path under /dev/",
        ),
        (_config(_volume(devices=["/dev/../etc/x"])), "volumes[0].devices[0]: must be an absolute"),
        (
            _config(_volume(devices=[GLOB, GLOB])),
            "volumes[0].devices[1]: '" + GLOB + "' is listed twice",
        ),
        (_config(_volume(raid="raid1")), 'volumes[0].raid: must be one of "none", "raid0"'),
        (
            _config(_volume(raid="none", devices=["/dev/nvme1n1", "/dev/nvme2n1"])),
            'volumes[0].devices: raid = "none" takes one device, and 2 are listed',
        ),
        (_config(_volume(filesystem="btrfs")), 'volumes[0].filesystem: must be one of "ext4"'),
        (_config(_volume(mount=None)), "volumes[0].mount: missing"),
        (_config(_volume(mount="data")), "volumes[0].mount: must be an absolute folder path"),
        (_config(_volume(mount="/var")), "volumes[0].mount: /var is a system folder"),
        (_config(_volume(mount="/")), "volumes[0].mount: / is a system folder"),
        (_config(_volume(mapper_name="a/b")), "volumes[0].mapper_name: must be 1-127"),
        (_config(_volume(mapper_name="root")), "volumes[0].mapper_name: 'root' is the root's"),
        (_config(_volume(mount_options="noatime")), "volumes[0].mount_options: must be a list"),
        (
            _config(_volume(mount_options=["noatime,nodev"])),
            "volumes[0].mount_options: each option",
        ),
        (_config(_volume(optional="yes")), "volumes[0].optional: must be true or false"),
        (_config(_volume(mountpoint="/data")), "volumes[0].mountpoint: unknown setting"),
        (_config(_volume(), _volume(mount="/other")), "volumes[1].name: 'data' is already"),
        (
            _config(_volume(), _volume(name="b", mapper_name="data", mount="/b")),
            "volumes[1].mapper_name: 'data' is already the mapper name of volume 'data'",
        ),
        (
            _config(_volume(), _volume(name="b", mount="/data/b")),
            "volumes[1].mount: /data/b and the mount of volume 'data' (/data)",
        ),
    ],
)
def test_every_mistake_names_its_field(data: dict[str, Any], expected: str) -> None:
    assert expected in _error(data)


def test_a_system_folder_below_is_fine() -> None:
    (v,) = parse_config(_config(_volume(mount="/var/lib/docker")), source="t").volumes
    assert v.mount == "/var/lib/docker"


# --- members -------------------------------------------------------------------------------------


def _vol(raid: Raid = Raid.RAID0, optional: bool = False) -> VolumeConfig:
    return VolumeConfig(name="data", devices=(GLOB,), mount="/data", raid=raid, optional=optional)


def test_nothing_matched_is_refused_unless_the_volume_is_optional() -> None:
    assert plan_members(_vol(), []).action is MembersAction.REFUSE
    assert "no device matches " + GLOB in plan_members(_vol(), []).reason
    assert plan_members(_vol(optional=True), []).action is MembersAction.SKIP


def test_one_device_is_used_directly_even_with_raid0() -> None:
    for raid in Raid:
        plan = plan_members(_vol(raid), [MemberProbe("/dev/nvme1n1")])
        assert (plan.action, plan.target) == (MembersAction.USE_DEVICE, "/dev/nvme1n1")


def test_raid_none_with_several_matches_is_refused_never_guessed() -> None:
    plan = plan_members(_vol(Raid.NONE), [MemberProbe("/dev/nvme1n1"), MemberProbe("/dev/nvme2n1")])
    assert plan.action is MembersAction.REFUSE and "2 match" in plan.reason


def test_blank_members_make_a_new_array() -> None:
    plan = plan_members(_vol(), [MemberProbe("/dev/nvme1n1"), MemberProbe("/dev/nvme2n1")])
    assert (plan.action, plan.target) == (MembersAction.CREATE_ARRAY, None)


def test_members_of_one_array_are_assembled_and_a_running_array_is_used() -> None:
    members = [MemberProbe(f"/dev/nvme{i}n1", "linux_raid_member", "u-1") for i in (1, 2)]
    assert plan_members(_vol(), members).action is MembersAction.ASSEMBLE_ARRAY
    running = [MemberProbe(m.path, m.signature, m.raid_uuid, ("md127",)) for m in members]
    plan = plan_members(_vol(), running)
    assert (plan.action, plan.target) == (MembersAction.USE_ARRAY, "/dev/md127")


@pytest.mark.parametrize(
    "members",
    [
        # one blank, one with a filesystem: a disk was replaced, or a glob caught another disk
        [MemberProbe("/dev/nvme1n1"), MemberProbe("/dev/nvme2n1", "ext4")],
        # members of two different arrays
        [
            MemberProbe("/dev/nvme1n1", "linux_raid_member", "u-1"),
            MemberProbe("/dev/nvme2n1", "linux_raid_member", "u-2"),
        ],
        # one member of an array and one blank disk
        [MemberProbe("/dev/nvme1n1", "linux_raid_member", "u-1"), MemberProbe("/dev/nvme2n1")],
        # a partitioned disk
        [MemberProbe("/dev/nvme0n1", "partition table (gpt)"), MemberProbe("/dev/nvme1n1")],
        # held by two different things
        [
            MemberProbe("/dev/nvme1n1", holders=("md127",)),
            MemberProbe("/dev/nvme2n1", holders=("dm-0",)),
        ],
        # blank but in use
        [MemberProbe("/dev/nvme1n1", holders=("dm-0",)), MemberProbe("/dev/nvme2n1")],
    ],
)
def test_anything_but_all_blank_or_all_ours_is_refused_naming_each_device(
    members: list[MemberProbe],
) -> None:
    plan = plan_members(_vol(), members)
    assert plan.action is MembersAction.REFUSE
    for m in members:
        assert m.path in plan.reason


# --- target --------------------------------------------------------------------------------------


def test_a_blank_device_is_formatted() -> None:
    assert plan_target(_vol(), TargetProbe("/dev/md127")).action is TargetAction.FORMAT


def test_our_interrupted_format_is_formatted_again() -> None:
    probe = TargetProbe("/dev/md127", "crypto_LUKS", 2, "u", FORMATTING_SUBSYSTEM, our_tokens=1)
    plan = plan_target(_vol(), probe)
    assert plan.action is TargetAction.FORMAT and "never held data" in plan.reason
    # ... even before its token was written
    probe = TargetProbe("/dev/md127", "crypto_LUKS", 2, "u", FORMATTING_SUBSYSTEM)
    assert plan_target(_vol(), probe).action is TargetAction.FORMAT


def test_our_finished_volume_is_unlocked() -> None:
    probe = TargetProbe("/dev/md127", "crypto_LUKS", 2, "u", VOLUME_SUBSYSTEM, our_tokens=1)
    assert plan_target(_vol(), probe).action is TargetAction.UNLOCK
    # an enrolled device without our subsystem mark is ours too (tokens decide)
    probe = TargetProbe("/dev/md127", "crypto_LUKS", 2, "u", None, our_tokens=2)
    assert plan_target(_vol(), probe).action is TargetAction.UNLOCK


@pytest.mark.parametrize(
    ("probe", "why"),
    [
        (TargetProbe("/dev/nvme1n1", "ext4"), "holds a signature (ext4)"),
        (TargetProbe("/dev/nvme1n1", "partition table (dos)"), "partition table"),
        (TargetProbe("/dev/nvme1n1", "crypto_LUKS", 1), "LUKS1"),
        (
            TargetProbe("/dev/nvme1n1", "crypto_LUKS", 2, "u", None),
            "without an encryptrootfs token",
        ),
        (
            TargetProbe("/dev/nvme1n1", "crypto_LUKS", 2, "u", "other", 0, ("token 0: bad",)),
            "token 0: bad",
        ),
        (
            TargetProbe("/dev/nvme1n1", "crypto_LUKS", 2, "u", None, 1, reencryption_pending=True),
            "unfinished reencryption",
        ),
        (TargetProbe("/dev/nvme1n1", holders=("dm-0",)), "in use by dm-0"),
        (
            TargetProbe(
                "/dev/nvme1n1", "crypto_LUKS", 2, "u", None, 1, holders=("dm-0",), open_as="other"
            ),
            "open under another name",
        ),
        (
            TargetProbe("/dev/nvme1n1", "crypto_LUKS", 2, error="header unreadable"),
            "header unreadable",
        ),
    ],
)
def test_anything_else_is_refused_with_the_reason(probe: TargetProbe, why: str) -> None:
    plan = plan_target(_vol(), probe)
    assert plan.action is TargetAction.REFUSE
    assert why in plan.reason and probe.path in plan.reason


def test_an_open_volume_is_not_opened_again() -> None:
    probe = TargetProbe(
        "/dev/md127", "crypto_LUKS", 2, "u", VOLUME_SUBSYSTEM, 1, holders=("dm-0",), open_as="data"
    )
    assert plan_target(_vol(), probe).action is TargetAction.ALREADY_OPEN
    unfinished = TargetProbe(
        "/dev/md127",
        "crypto_LUKS",
        2,
        "u",
        FORMATTING_SUBSYSTEM,
        1,
        holders=("dm-0",),
        open_as="data",
    )
    plan = plan_target(_vol(), unfinished)
    assert plan.action is TargetAction.REFUSE and "cryptsetup close data" in plan.reason


# --- mounts --------------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw
40 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
61 22 254:1 / /data rw,relatime shared:30 - ext4 /dev/mapper/data rw
62 22 254:2 / /my\\040disk rw - xfs /dev/mapper/x rw
"""


def test_mountinfo_is_parsed_with_escapes() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert entries[2] == MountEntry("/data", os.makedev(254, 1), "/dev/mapper/data", "ext4")
    assert entries[3].mount_point == "/my disk"


def test_mounted_here_tells_ours_from_another_device_and_from_nothing() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert mounted_here(entries, "/data", os.makedev(254, 1)) is True
    assert mounted_here(entries, "/data", os.makedev(254, 9)) is False
    assert mounted_here(entries, "/scratch", os.makedev(254, 1)) is None


# --- unwrap retries ------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_unwrap_retries_a_passing_failure_until_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from encryptrootfs.ops import volumes
    from encryptrootfs.providers.base import ProviderName, WrappedKey
    from encryptrootfs.token import KmsToken

    token = KmsToken(("0",), WrappedKey(ProviderName.AWS_KMS, ARN, "eu-west-1", b"c", {}))
    calls: list[int] = []

    class Flaky:
        def unwrap(self, wrapped: WrappedKey) -> bytearray:
            calls.append(1)
            if len(calls) < 3:
                raise KeyServiceError("KMS did not answer.", retryable=True)
            return bytearray(b"k" * 64)

    monkeypatch.setattr(volumes, "our_tokens", lambda device: [token])
    monkeypatch.setattr(volumes, "provider_for_token", lambda config, wrapped: Flaky())
    config = parse_config(_config(_volume()) | {"boot": {"unlock_timeout": 10}}, source="t")
    clock = _Clock()
    key, used = unwrap_key(config, "/dev/md127", clock=clock, sleep=clock.sleep)
    assert (bytes(key), used, len(calls), clock.sleeps) == (b"k" * 64, token, 3, [1.0, 2.0])

    calls.clear()
    clock = _Clock()

    class Down:
        def unwrap(self, wrapped: WrappedKey) -> bytearray:
            raise KeyServiceError("KMS did not answer.", retryable=True)

    monkeypatch.setattr(volumes, "provider_for_token", lambda config, wrapped: Down())
    with pytest.raises(KeyServiceError) as e:
        unwrap_key(config, "/dev/md127", clock=clock, sleep=clock.sleep)
    assert "stays locked" in e.value.message and clock.now <= 10

    class Denied:
        def unwrap(self, wrapped: WrappedKey) -> bytearray:
            raise KeyServiceError("Access denied.", retryable=False)

    monkeypatch.setattr(volumes, "provider_for_token", lambda config, wrapped: Denied())
    clock = _Clock()
    with pytest.raises(KeyServiceError, match="Access denied"):
        unwrap_key(config, "/dev/md127", clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []
