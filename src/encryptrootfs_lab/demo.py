"""`make demo`: the main job on the embedded default, end to end, in a local VM.

A plain Debian image with encryptrootfs installed (the lab's default disk: ext4 root on GPT
with free space after it) boots twice against the local KMS and IMDS emulators: the first boot
encrypts the root in place, the second unlocks it through KMS. The report says what happened
and how long it took, measured, not assumed.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .cloud import emulated_cloud
from .image import build_image
from .layout import DiskLayout, build_disk
from .machine import Machine
from .product import ENCRYPT, create_lab_key, inspect_script
from .qemu import BootResult

_FINISHED = re.compile(r"encryption finished: (\d+) MiB in ([\d.]+) s(?: \(([\d.]+) MiB/s\))?")


@dataclass(frozen=True)
class BootReport:
    name: str
    wall_s: float
    multi_user_s: Optional[float]  # guest uptime when the boot settled
    root_on_dm_crypt: bool
    manifest_ok: bool
    kms_calls: tuple[str, ...]
    data_pass: Optional[tuple[int, float, Optional[float]]]  # MiB, seconds, MiB/s
    journal: tuple[str, ...]


def report_boot(r: BootResult, kms_calls: tuple[str, ...]) -> BootReport:
    dev = r.marker("ROOTDEV")
    journal = tuple(m.value for m in r.all("JOURNAL"))
    data_pass = None
    for line in journal:
        m = _FINISHED.search(line)
        if m:
            data_pass = (
                int(m.group(1)),
                float(m.group(2)),
                float(m.group(3)) if m.group(3) else None,
            )
    return BootReport(
        name=r.name,
        wall_s=r.wall_seconds,
        multi_user_s=r.guest_uptime_at_boot,
        root_on_dm_crypt=bool(dev and dev.fields().get("dm") == "crypt"),
        manifest_ok=r.marker("TREE-OK") is not None and r.marker("VERIFY-FAILED") is None,
        kms_calls=kms_calls,
        data_pass=data_pass,
        journal=journal,
    )


def run_demo(out: Callable[[str], None] = print) -> int:
    started = time.monotonic()
    out("encryptrootfs demo: building (or reusing) the image and disk ...")
    image = build_image(ENCRYPT)
    disk = build_disk(DiskLayout(), image)
    out(
        f"  image {image.key} ({'cached' if image.cached else f'{image.build_seconds:.0f} s'}),"
        f" disk {disk.layout.name} ({'cached' if disk.cached else f'{disk.build_seconds:.0f} s'})"
    )
    reports = []
    with emulated_cloud() as cloud, tempfile.TemporaryDirectory(prefix="erfs-demo-") as tmp:
        arn = create_lab_key(cloud.kms)
        out(f"  KMS emulator on {cloud.kms.url}, key {arn}; IMDS emulator on {cloud.imds.url}")
        machine = Machine(image, disk, Path(tmp), forwards=cloud.forwards())
        for what in ("first boot: encrypt the root in place", "second boot: unlock through KMS"):
            out(f"booting ({what}) ...")
            cloud.kms.clear_log()
            r = machine.boot(inspect_script(), timeout=900)
            rep = report_boot(r, tuple(q.action for q in cloud.kms.requests))
            reports.append(rep)
            for line in rep.journal:
                out(f"    | {line}")
            if not r.ok:
                out(r.describe(40))
                out("demo FAILED: the boot did not complete")
                return 1
    out("")
    out("encryptrootfs demo report")
    for rep in reports:
        settled = f", multi-user at {rep.multi_user_s:.1f} s" if rep.multi_user_s else ""
        out(
            f"  {rep.name}: {rep.wall_s:.1f} s wall{settled}; root on dm-crypt: "
            f"{'yes' if rep.root_on_dm_crypt else 'NO'}; test tree verified: "
            f"{'yes' if rep.manifest_ok else 'NO'}; KMS calls: {', '.join(rep.kms_calls)}"
        )
        if rep.data_pass:
            mib, seconds, rate = rep.data_pass
            out(
                f"    data pass: {mib} MiB in {seconds:.1f} s"
                + (f" ({rate:.1f} MiB/s)" if rate else "")
            )
    first, second = reports
    encrypted = first.root_on_dm_crypt and first.data_pass is not None
    unlocked = second.root_on_dm_crypt and second.kms_calls == ("Decrypt",)
    ok = encrypted and unlocked and all(r.manifest_ok for r in reports)
    total = time.monotonic() - started
    out(
        f"  encrypted on boot 1: {'yes' if encrypted else 'NO'}; unlocked on boot 2: "
        f"{'yes' if unlocked else 'NO'}; total {total:.0f} s"
    )
    return 0 if ok else 1
