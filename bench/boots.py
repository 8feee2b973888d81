"""Measures 3 and 4: the unlock's cost, split, and what the module adds to every later boot.

One machine of the product image (ENCRYPT) is encrypted by its first boot; then later boots of
it alternate with boots of the plain image (the same Debian, the same dracut modules but not
encryptrootfs's, same disk layout), all with the same RAM and the emulated cloud attached. Each
boot reports ``systemd-analyze`` and the journal with monotonic timestamps; each later boot also
runs bench/guest/unlock_bench.py (Python start, imports, IMDS, KMS, keyslot opens).

Network bring-up is excluded from the boot overhead as follows: the plain image's initrd brings
no network up, the product's does (its KMS call needs it). The time the unit waited for the
network is the time from its Python's first line to the initrd's DHCP lease (systemd-networkd's
"DHCPv4 address" line), when the lease came later; it is subtracted from the difference.
"""

from __future__ import annotations

import re
import shutil
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from encryptrootfs_lab.cloud import emulated_cloud
from encryptrootfs_lab.image import PLAIN, build_image
from encryptrootfs_lab.layout import DiskLayout, build_disk
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import ENCRYPT, create_lab_key
from encryptrootfs_lab.qemu import BootResult

from .common import GUEST_MEMORY_MIB, MIB, WORKDIR, bench_markers, guest_file


@dataclass(frozen=True)
class BootRuns:
    pairs: int  # later boots of the encrypted image, each after a boot of the plain image
    unlock_rounds: int


FULL = BootRuns(pairs=2, unlock_rounds=2)
SMALL = BootRuns(pairs=1, unlock_rounds=1)

ANALYZE = r"""
echo "ERFS-SA-TIME $(systemd-analyze time --no-pager | head -1)"
systemd-analyze blame --no-pager | grep -v '\.device$' | head -15 | sed 's/^ */ERFS-SA-BLAME /'
journalctl -b -o short-monotonic --no-pager \
  | grep -E 'encryptrootfs|DHCPv4 address|Startup finished|initrd-switch-root|Switching root' \
  | head -300 | sed 's/^/ERFS-JMONO /'
"""

FIRST = r"""
journalctl -b -u encryptrootfs.service --no-pager -o cat | grep -E 'finished|MiB/s' \
  | tail -3 | sed 's/^/ERFS-FIRST /'
"""

_MONO = re.compile(r"^\[\s*(\d+\.\d+)\]\s+\S+\s+([^:]+):\s(.*)$")
_STARTUP = re.compile(r"(?:([\d.]+min )?([\d.]+)(m?s)) \((kernel|initrd|userspace)\)")


def _seconds(minutes: Optional[str], value: str, unit: str) -> float:
    s = float(value) / (1000 if unit == "ms" else 1)
    if minutes:
        s += 60 * float(minutes.split("min")[0])
    return s


def parse_startup(line: str) -> dict[str, float]:
    """``Startup finished in 3.1s (kernel) + 9.8s (initrd) + 21.4s (userspace) = ...``"""
    phases = {
        phase: _seconds(mins, value, unit) for mins, value, unit, phase in _STARTUP.findall(line)
    }
    if phases:
        phases["total"] = sum(phases.values())
    return phases


def journal_events(result: BootResult) -> list[tuple[float, str, str]]:
    events = []
    for m in result.all("JMONO"):
        hit = _MONO.match(m.value)
        if hit:
            events.append((float(hit.group(1)), hit.group(2), hit.group(3)))
    return events


def _first(
    events: list[tuple[float, str, str]], pattern: str, who: Optional[str] = None
) -> Optional[float]:
    rx = re.compile(pattern)
    for t, ident, text in events:
        if rx.search(text) and (who is None or ident.startswith(who)):
            return t
    return None


def unlock_timeline(result: BootResult) -> dict[str, Optional[float]]:
    """Monotonic times (guest seconds) of the unit's steps, from the journal."""
    ev = journal_events(result)
    start = _first(ev, r"Starting encryptrootfs\.service", "systemd")
    py_first = next(
        (
            t
            for t, ident, text in ev
            if start is not None
            and t >= start
            and not ident.startswith("systemd")
            and "encryptrootfs" in text
        ),
        None,
    )
    dhcp = _first(ev, r"DHCPv4 address")
    unwrapped = _first(ev, r"done on attempt")
    opened = _first(ev, r"opened as /dev/mapper/")
    started = _first(
        ev, r"Finished encryptrootfs\.service|Started encryptrootfs\.service", "systemd"
    )
    return {
        "unit_start": start,
        "python_first_line": py_first,
        "dhcp_lease": dhcp,
        "unwrapped": unwrapped,
        "mapper_ready": opened,
        "unit_done": started,
    }


def _boot_record(result: BootResult) -> dict[str, Any]:
    line = result.marker("SA-TIME")
    return {
        "name": result.name,
        "ok": result.ok,
        "wall_s": result.wall_seconds,
        "uptime_at_multi_user": result.guest_uptime_at_boot,
        "startup": parse_startup(line.value if line else ""),
        "startup_line": line.value if line else None,
        "blame": [m.value for m in result.all("SA-BLAME")],
    }


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def run(runs: BootRuns) -> dict[str, Any]:
    plain_image, enc_image = build_image(PLAIN), build_image(ENCRYPT)
    plain_disk = build_disk(DiskLayout(), plain_image)
    enc_disk = build_disk(DiskLayout(), enc_image)
    work = WORKDIR / "boot"
    shutil.rmtree(work, ignore_errors=True)
    unlock_script = (
        guest_file("unlock_bench.py", "/run/unlock_bench.py")
        + f"python3 /run/unlock_bench.py {runs.unlock_rounds}\n"
    )
    plain_boots: list[dict[str, Any]] = []
    later_boots: list[dict[str, Any]] = []
    guest_unlock: list[dict[str, Any]] = []
    with emulated_cloud() as cloud:
        create_lab_key(cloud.kms)
        enc = Machine(enc_image, enc_disk, work / "encrypted", forwards=cloud.forwards())
        enc.attach_blank(64 * MIB, serial="unlk")
        plain = Machine(plain_image, plain_disk, work / "plain", forwards=cloud.forwards())
        plain.attach_blank(64 * MIB, serial="unlk")  # the same devices in both
        first = enc.boot(FIRST, timeout=1800, memory_mib=GUEST_MEMORY_MIB, name="first")
        if not first.ok:
            raise RuntimeError(f"the first boot did not encrypt:\n{first.describe(40)}")
        for i in range(runs.pairs):
            p = plain.boot(ANALYZE, timeout=600, memory_mib=GUEST_MEMORY_MIB, name=f"plain{i}")
            if not p.ok:
                raise RuntimeError(f"plain boot {i} failed:\n{p.describe(40)}")
            plain_boots.append(_boot_record(p))
            e = enc.boot(
                ANALYZE + unlock_script, timeout=900, memory_mib=GUEST_MEMORY_MIB, name=f"later{i}"
            )
            if not e.ok:
                raise RuntimeError(f"later boot {i} failed:\n{e.describe(40)}")
            record = _boot_record(e)
            record["unlock_timeline"] = unlock_timeline(e)
            later_boots.append(record)
            guest_unlock.append({m.pop("kind"): m for m in bench_markers(e.results)})
    first_lines = [m.value for m in first.all("FIRST")]
    return {
        "guest_memory_mib": GUEST_MEMORY_MIB,
        "first_boot": {
            "wall_s": first.wall_seconds,
            "lines": first_lines,
            "uptime_at_multi_user": first.guest_uptime_at_boot,
        },
        "plain_boots": plain_boots,
        "later_boots": later_boots,
        "guest_unlock": guest_unlock,
        "summary": summarize(plain_boots, later_boots, guest_unlock),
    }


def summarize(
    plain: list[dict[str, Any]], later: list[dict[str, Any]], guest: list[dict[str, Any]]
) -> dict[str, Any]:
    def phase(boots: list[dict[str, Any]], name: str) -> Optional[float]:
        return _median([b["startup"][name] for b in boots if name in b["startup"]])

    steps: dict[str, list[float]] = {
        "unit_s": [],
        "start_to_python_s": [],
        "network_wait_s": [],
        "python_to_unwrapped_s": [],
        "open_s": [],
    }
    for b in later:
        t = b["unlock_timeline"]
        if None in (t["unit_start"], t["python_first_line"], t["unwrapped"], t["mapper_ready"]):
            continue
        steps["unit_s"].append(t["mapper_ready"] - t["unit_start"])
        steps["start_to_python_s"].append(t["python_first_line"] - t["unit_start"])
        steps["python_to_unwrapped_s"].append(t["unwrapped"] - t["python_first_line"])
        steps["open_s"].append(t["mapper_ready"] - t["unwrapped"])
        lease = t["dhcp_lease"]
        steps["network_wait_s"].append(max(0.0, lease - t["python_first_line"]) if lease else 0.0)
    med = {k: _median(v) for k, v in steps.items()}

    def guest_median(kind: str, key: str) -> Optional[float]:
        values = []
        for g in guest:
            v = g.get(kind, {}).get(key)
            values.append(v["median"] if isinstance(v, dict) else v)
        return _median([v for v in values if v is not None])

    split = {
        "python_start_s": guest_median("unlock-python", "python_start_s"),
        "imports_s": guest_median("unlock-python", "imports_s"),
        "imds_s": guest_median("unlock-kms", "imds_s"),
        "kms_client_s": guest_median("unlock-kms", "client_s"),
        "kms_decrypt_s": guest_median("unlock-kms", "kms_s"),
        "cryptsetup_open_s": med["open_s"],
    }
    # What the unit does before its first line, re-run in the real root (unlock_bench.py): the
    # rest of the journal's "unit start to Python's first line" is the initrd's own waiting
    # (udev's coldplug queue drained by `udevadm settle`) and contention with other units.
    before: dict[str, Optional[float]] = {}
    for key in (
        "import_cli_s",
        "import_boot_s",
        "load_config_s",
        "udev_settle_idle_s",
        "locate_root_s",
        "decide_s",
        "process_s",
    ):
        before[key] = _median(
            [
                g["unlock-bootpath"]["median"][key]
                for g in guest
                if key in g.get("unlock-bootpath", {}).get("median", {})
            ]
        )
    groups = [
        g["unlock-bootpath"]["boot_imports_self_us_by_group"]
        for g in guest
        if "unlock-bootpath" in g
    ]
    if groups:
        before["imports_ours_s"] = _median([g.get("encryptrootfs", 0) / 1e6 for g in groups])
        before["imports_all_s"] = _median([sum(g.values()) / 1e6 for g in groups])
    process, at_boot = before.get("process_s"), med["start_to_python_s"]
    if process is not None and at_boot is not None:
        before["unexplained_at_boot_s"] = at_boot - process
    argon2 = guest_median("unlock-open", "argon2_keyslot_open_s")
    token_open = guest_median("unlock-open", "token_keyslot_open_s")
    plain_total, enc_total = phase(plain, "total"), phase(later, "total")
    overhead = (
        enc_total - plain_total if plain_total is not None and enc_total is not None else None
    )
    net = med["network_wait_s"] or 0.0
    return {
        "unit": med,
        "split": split,
        "before_first_line": before,
        "argon2_open_s": argon2,
        "token_keyslot_open_s": token_open,
        "ratio_unit_to_argon2": med["unit_s"] / argon2 if med["unit_s"] and argon2 else None,
        "ratio_open_to_argon2": token_open / argon2 if token_open and argon2 else None,
        "plain": {k: phase(plain, k) for k in ("kernel", "initrd", "userspace", "total")},
        "encrypted": {k: phase(later, k) for k in ("kernel", "initrd", "userspace", "total")},
        "overhead_s": overhead,
        "overhead_without_network_s": overhead - net if overhead is not None else None,
    }
