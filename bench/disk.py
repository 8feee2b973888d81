"""Measures 1 and 2: first-boot data pass vs raw dm-crypt, memory vs size, the 2016 baseline.

One boot of the plain lab image with blank data disks attached, all measured by
bench/guest/disk_bench.py in the same guest and the same boot: for each throughput size a raw
dm-crypt write, the product's data pass, a raw write again (alternating, so drift on the shared
host shows up as a difference between the two raw numbers); then the memory disk: 1.5 GiB of
data in a 2 GiB filesystem, the 2016 baseline, and the product's data pass on the same disk.
Then, on one more disk, what explains the data pass's rate: dm-crypt's write, read and in-place
copy, the ciphers' own speeds (cryptsetup's benchmark, OpenSSL), and the data pass with other
hotzone sizes, resilience modes and online (dm-crypt opened first), each with the I/O it did and
the CPU time cryptsetup spent in user space and in the kernel.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

from encryptrootfs_lab.image import PLAIN, build_image
from encryptrootfs_lab.layout import DiskLayout, build_disk
from encryptrootfs_lab.machine import Machine

from .common import GUEST_MEMORY_MIB, MIB, WORKDIR, bench_markers, guest_file


@dataclass(frozen=True)
class DiskSizes:
    throughput_mib: tuple[int, ...]
    memory_disk_mib: int
    memory_data_mib: int
    variants_mib: int  # one disk on which the data pass's variants and the engine's limits run


FULL = DiskSizes((256, 512, 1024), 2048, 1536, 256)
SMALL = DiskSizes((64, 128), 320, 192, 128)


def guest_script(sizes: DiskSizes) -> str:
    config = {
        "throughput": [{"serial": f"tp{s}", "size_mib": s} for s in sizes.throughput_mib],
        "memory": {
            "serial": "mem",
            "size_mib": sizes.memory_disk_mib,
            "data_mib": sizes.memory_data_mib,
        },
        "baseline_script": "/run/baseline_2016.sh",
        "variants": {"serial": "var", "size_mib": sizes.variants_mib},
    }
    return (
        guest_file("disk_bench.py", "/run/disk_bench.py")
        + guest_file("baseline_2016.sh", "/run/baseline_2016.sh")
        + f"python3 /run/disk_bench.py '{json.dumps(config)}'\n"
    )


def run(sizes: DiskSizes) -> dict[str, Any]:
    image = build_image(PLAIN)
    disk = build_disk(DiskLayout(), image)
    work = WORKDIR / "disk"
    shutil.rmtree(work, ignore_errors=True)
    machine = Machine(image, disk, work)
    for size in sizes.throughput_mib:
        machine.attach_blank(size * MIB, serial=f"tp{size}")
    machine.attach_blank(sizes.memory_disk_mib * MIB, serial="mem")
    machine.attach_blank(sizes.variants_mib * MIB, serial="var")
    # The variants: ~9 data passes and 6 dd passes over their disk.
    total = sum(sizes.throughput_mib) + sizes.memory_disk_mib + 15 * sizes.variants_mib
    # ~16 MiB/s for the data pass and ~3 more passes at raw speed under TCG, shared host
    timeout = 600 + total * 0.6
    result = machine.boot(
        guest_script(sizes), timeout=timeout, memory_mib=GUEST_MEMORY_MIB, name="disk"
    )
    found = bench_markers(result.results)
    if not result.ok:
        raise RuntimeError(f"the disk benchmark guest failed:\n{result.describe(40)}")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in found:
        by_kind.setdefault(item.pop("kind"), []).append(item)
    return {
        "guest_memory_mib": GUEST_MEMORY_MIB,
        "wall_s": result.wall_seconds,
        "guest": by_kind.get("guest", [{}])[0],
        "throughput": by_kind.get("throughput", []),
        "memory_data": by_kind.get("memory-data", []),
        "baseline_2016": by_kind.get("baseline-2016", []),
        "memory": by_kind.get("memory", []),
        "engine": by_kind.get("engine", []) + by_kind.get("engine-after", []),
        "variants": by_kind.get("variant", []),
        "variants_disk_mib": sizes.variants_mib,
        "console": str(result.console_path),
    }
