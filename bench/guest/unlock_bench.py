"""Guest side of the unlock benchmark, run in the real root after a later (unlocking) boot.

Splits what the initramfs unit does into pieces measured from outside the product's boot code:
Python's start (``python3 -I -B -c pass``, the unit's flags), the imports of the boot path, and
in one process with a fresh provider per round (``provider_for_token``, as the boot makes it):
credentials through IMDSv2, the botocore KMS client, the ``Decrypt`` call. Then ``cryptsetup
open`` of a scratch LUKS2 disk through a keyslot made like the product's (PBKDF2, 1000
iterations) against a default (benchmarked Argon2id) passphrase keyslot on the same disk,
alternating. Prints ``ERFS-BENCH {json}`` lines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT_PARTITION = "/dev/vda1"  # the lab's root partition (first partition of the first disk)
BOOT_IMPORTS = (
    "import encryptrootfs.cli, encryptrootfs.boot, encryptrootfs.boot.unlock, "
    "encryptrootfs.providers.aws_kms, botocore.session, botocore.config"
)
PASSPHRASE = b"correct horse battery staple, benchmark only\n"


def emit(kind: str, **data: Any) -> None:
    print("ERFS-BENCH " + json.dumps({"kind": kind, **data}, sort_keys=True), flush=True)


def timed(argv: list[str], stdin: bytes = b"") -> float:
    start = time.monotonic()
    subprocess.run(argv, input=stdin, check=True, capture_output=True)
    return time.monotonic() - start


def python_costs(rounds: int) -> dict[str, Any]:
    # Once without -B first: the real root's packages may have no byte code yet (the initramfs
    # ships it), and compiling is not part of an unlock.
    subprocess.run([sys.executable, "-c", BOOT_IMPORTS], check=True)
    bare = [timed([sys.executable, "-I", "-B", "-c", "pass"]) for _ in range(rounds)]
    full = [timed([sys.executable, "-I", "-B", "-c", BOOT_IMPORTS]) for _ in range(rounds)]
    trace = subprocess.run(
        [sys.executable, "-I", "-B", "-X", "importtime", "-c", BOOT_IMPORTS],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    top: dict[str, int] = {}
    for line in trace.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            name = parts[2]
            if not name.startswith(" ") and name.split(".")[0] == name:  # top-level packages
                top[name] = max(top.get(name, 0), int(parts[1]))
    biggest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    return {
        "python_start_s": statistics.median(bare),
        "python_start_all": bare,
        "imports_s": statistics.median(full) - statistics.median(bare),
        "imports_all": [f - statistics.median(bare) for f in full],
        "importtime_top_us": biggest,
    }


BOOT_STEPS = r"""
import json, sys, time
t0 = time.monotonic()
import encryptrootfs.cli
t1 = time.monotonic()
from encryptrootfs.boot import boot, locate_root, root_spec
from encryptrootfs import devices
from encryptrootfs.boot.decide import decide
t2 = time.monotonic()
from encryptrootfs.config import load_config
config = load_config()
t3 = time.monotonic()
devices.wait_for_udev(30)
t4 = time.monotonic()
spec = root_spec(config)
root = locate_root(spec, 30)
t5 = time.monotonic()
decision = decide(spec, root, first_boot_enabled=config.first_boot.enabled)
t6 = time.monotonic()
print(json.dumps({"import_cli_s": t1 - t0, "import_boot_s": t2 - t1, "load_config_s": t3 - t2,
                  "udev_settle_idle_s": t4 - t3, "locate_root_s": t5 - t4, "decide_s": t6 - t5,
                  "action": str(decision.action), "modules": sorted(sys.modules)}))
"""


def boot_path_costs(rounds: int) -> dict[str, Any]:
    """What the unit does before its first console line, measured in the real root with the
    unit's interpreter flags: the interpreter, the imports of ``encryptrootfs boot`` (its
    ``-X importtime`` trace, grouped), reading the config, ``udevadm settle`` (idle here: at boot
    it also waits for the coldplug events still queued), finding the root (blkid and the LUKS2
    header through cryptsetup) and deciding. Whatever the unit took beyond these at boot is
    the initrd's contention (udev's coldplug, networkd, the other units on two vCPUs)."""
    flags = [sys.executable, "-I", "-B"]
    steps: list[dict[str, Any]] = []
    for _ in range(rounds):
        start = time.monotonic()
        done = subprocess.run(
            [*flags, "-c", BOOT_STEPS], capture_output=True, text=True, check=True
        )
        step = json.loads(done.stdout)
        step["process_s"] = time.monotonic() - start
        steps.append(step)
    modules: list[str] = steps[-1].pop("modules")
    for step in steps[:-1]:
        step.pop("modules", None)
    # The boot path's imports, module by module (self time, median of the traces: one trace
    # under TCG has stalls of a few hundred ms), grouped by package: what a lazier import could
    # save and what is third-party.
    per_module: dict[str, list[int]] = {}
    for _ in range(rounds):
        trace = subprocess.run(
            [
                *flags,
                "-X",
                "importtime",
                "-c",
                "import encryptrootfs.cli; import encryptrootfs.boot",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        for line in trace.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[1].isdigit():
                per_module.setdefault(parts[2], []).append(int(parts[0].split(":")[1]))
    groups: dict[str, int] = {}
    ours: dict[str, int] = {}
    for name, values in per_module.items():
        self_us = int(statistics.median(values))
        top = name.split(".")[0]
        group = top if top in ("encryptrootfs", "botocore", "urllib3") else "stdlib"
        groups[group] = groups.get(group, 0) + self_us
        if top == "encryptrootfs":
            ours[name] = self_us
    keys = [k for k in steps[0] if isinstance(steps[0][k], float)]
    return {
        "median": {k: statistics.median(s[k] for s in steps) for k in keys},
        "all": steps,
        "action": steps[0]["action"],
        "boot_imports_self_us_by_group": groups,
        "ours_self_us": dict(sorted(ours.items(), key=lambda kv: -kv[1])),
        "botocore_loaded_before_first_line": any(m.startswith("botocore") for m in modules),
        "modules_loaded": len(modules),
    }


def kms_costs(rounds: int) -> dict[str, Any]:
    from encryptrootfs import luks2
    from encryptrootfs.config import load_config
    from encryptrootfs.providers import provider_for_token
    from encryptrootfs.providers.base import wipe
    from encryptrootfs.token import TOKEN_TYPE, token_from_json

    config = load_config()
    header = luks2.read_header(ROOT_PARTITION)
    (token_id,) = header.token_ids(TOKEN_TYPE)
    token = token_from_json(luks2.export_token(ROOT_PARTITION, token_id))
    assert token is not None
    out: dict[str, list[float]] = {"imds_s": [], "client_s": [], "kms_s": [], "test_keyslot_s": []}
    for round_ in range(rounds + 1):  # round 0 warms up: lazy imports, byte code, file cache
        provider: Any = provider_for_token(config, token.wrapped)
        deadline = time.monotonic() + 60
        t0 = time.monotonic()
        provider._credentials(deadline)  # botocore session + IMDSv2 token, role, credentials
        t1 = time.monotonic()
        provider._client(token.wrapped.region, deadline)  # the KMS client (service model)
        t2 = time.monotonic()
        key = provider.unwrap(token.wrapped)  # one Decrypt
        t3 = time.monotonic()
        ok = luks2.test_keyslot(ROOT_PARTITION, key, int(token.keyslots[0]))
        t4 = time.monotonic()
        wipe(key)
        assert ok
        if round_ == 0:
            continue
        for name, value in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            out[name].append(value)
    return {name: {"median": statistics.median(v), "all": v} for name, v in out.items()}


def open_costs(serial: str, rounds: int) -> dict[str, Any]:
    dev = os.path.realpath(f"/dev/disk/by-id/virtio-{serial}")
    key = bytearray(os.urandom(64))
    try:
        # The product's keyslot: a random 64-byte key, PBKDF2 with 1000 iterations.
        subprocess.run(
            [
                "cryptsetup",
                "luksFormat",
                "-q",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                "-",
                dev,
            ],
            input=bytes(key),
            check=True,
            capture_output=True,
        )
        read_fd, write_fd = os.pipe()
        os.write(write_fd, PASSPHRASE)
        os.close(write_fd)
        # A default passphrase keyslot: cryptsetup benchmarks Argon2id for this guest.
        add_s = time.monotonic()
        subprocess.run(
            ["cryptsetup", "luksAddKey", "-q", "--key-file", "-", dev, f"/dev/fd/{read_fd}"],
            input=bytes(key),
            check=True,
            capture_output=True,
            pass_fds=(read_fd,),
        )
        add_s = time.monotonic() - add_s
        os.close(read_fd)
        dump = json.loads(
            subprocess.run(
                ["cryptsetup", "luksDump", "--dump-json-metadata", dev],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
        )
        kdf = dump["keyslots"]["1"]["kdf"]
        slot0: list[float] = []
        slot1: list[float] = []
        for _ in range(rounds):
            for slot, secret, times in (("0", bytes(key), slot0), ("1", PASSPHRASE, slot1)):
                times.append(
                    timed(
                        [
                            "cryptsetup",
                            "open",
                            "--key-slot",
                            slot,
                            "--key-file",
                            "-",
                            dev,
                            "erfsbenchopen",
                        ],
                        secret,
                    )
                )
                subprocess.run(["cryptsetup", "close", "erfsbenchopen"], check=True)
    finally:
        key[:] = bytes(len(key))
    return {
        "token_keyslot_open_s": {"median": statistics.median(slot0), "all": slot0},
        "argon2_keyslot_open_s": {"median": statistics.median(slot1), "all": slot1},
        "argon2_kdf": {k: v for k, v in kdf.items() if k != "salt"},
        "argon2_add_key_s": add_s,
    }


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    emit("unlock-python", **python_costs(rounds + 2))
    emit("unlock-bootpath", **boot_path_costs(rounds + 1))
    emit("unlock-kms", **kms_costs(rounds))
    emit("unlock-open", **open_costs("unlk", rounds))


if __name__ == "__main__":
    main()
