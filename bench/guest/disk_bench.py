"""Guest side of the disk benchmarks: data-pass throughput and memory, raw dm-crypt writes.

Runs as root in a booted lab guest (Python 3.11, encryptrootfs installed). Each measurement is
printed as one line ``ERFS-BENCH {json}`` on stdout (the lab's results channel).

- ``product``: the product's own first-boot code path on a whole disk: the LUKS2 header with a
  pending encryption (``luks2.reencrypt_encrypt_init``, 32 MiB moved, 4096-byte sectors as the
  first boot picks for ext4) then ``boot.volume.data_pass`` (``cryptsetup reencrypt
  --resume-only``). It runs in a child process inside a cgroup of its own, so the memory of the
  whole pass (Python, cryptsetup, the kernel's charges) is what the cgroup saw.
- ``raw``: ``dd`` to a plain dm-crypt mapping with the same cipher, key size and sector size:
  what the engine can write in the same guest (the upper limit for the data pass).
- ``baseline``: the 2016 approach (bench/guest/baseline_2016.sh) in a cgroup capped below the
  guest's available memory, so that it runs out of memory on its own instead of the guest's.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
REDUCE = 32 * MIB
CIPHER = ("aes-xts-plain64", "512")  # LUKS2's default; the product does not override it


def emit(kind: str, **data: Any) -> None:
    print("ERFS-BENCH " + json.dumps({"kind": kind, **data}, sort_keys=True), flush=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True)


def device(serial: str) -> str:
    return os.path.realpath(f"/dev/disk/by-id/virtio-{serial}")


def size_bytes(dev: str) -> int:
    return int(sh("blockdev", "--getsize64", dev).stdout)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def zero_fill(dev: str) -> float:
    """Write the whole disk once (untimed for the results) so every later pass overwrites
    allocated storage: qcow2 reads of unallocated clusters would make the data pass look fast."""
    start = time.monotonic()
    count = size_bytes(dev) // (4 * MIB)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4M", f"count={count}", "oflag=direct", "status=none")
    return time.monotonic() - start


def raw_write(dev: str) -> dict[str, Any]:
    """Sequential write through a plain dm-crypt mapping (same cipher, key and sector size)."""
    name = "erfsbenchraw"
    sh(
        "cryptsetup",
        "open",
        "--type",
        "plain",
        "--cipher",
        CIPHER[0],
        "--key-size",
        CIPHER[1],
        "--sector-size",
        "4096",
        "--key-file",
        "/dev/urandom",
        "--keyfile-size",
        "64",
        dev,
        name,
    )
    try:
        mapped = f"/dev/mapper/{name}"
        nbytes = size_bytes(mapped) // (4 * MIB) * 4 * MIB
        drop_caches()
        start = time.monotonic()
        sh(
            "dd",
            "if=/dev/zero",
            f"of={mapped}",
            "bs=4M",
            f"count={nbytes // (4 * MIB)}",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        )
        seconds = time.monotonic() - start
    finally:
        sh("cryptsetup", "close", name)
    return {"mib": nbytes / MIB, "seconds": seconds, "mib_s": nbytes / MIB / seconds}


class Cgroup:
    """A leaf cgroup v2 with the memory controller; memory sampled while something runs."""

    def __init__(self, name: str, max_bytes: int | None = None) -> None:
        control = CGROUP_ROOT / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory\n")
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        if max_bytes is not None:
            (self.path / "memory.max").write_text(f"{max_bytes}\n")
        self.peak_anon = 0
        self.peak_current = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def stat(self) -> dict[str, int]:
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, value = line.split()
            out[key] = int(value)
        return out

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_anon = max(self.peak_anon, self.stat()["anon"])
                current = int((self.path / "memory.current").read_text())
                self.peak_current = max(self.peak_current, current)
            except (OSError, KeyError, ValueError):
                pass
            self._stop.wait(0.1)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        procs = self.path / "cgroup.procs"
        self._thread.start()
        try:
            return subprocess.run(
                argv,
                text=True,
                capture_output=True,
                timeout=timeout,
                check=False,
                # The child moves itself in before it execs: all its memory is charged here.
                preexec_fn=lambda: procs.write_text("0\n"),
            )
        finally:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        events = dict(
            line.split() for line in (self.path / "memory.events").read_text().splitlines()
        )
        peak_file = self.path / "memory.peak"
        peak = int(peak_file.read_text()) if peak_file.exists() else self.peak_current
        return {
            "cgroup_peak_mib": peak / MIB,
            "sampled_anon_peak_mib": self.peak_anon / MIB,
            "oom_kills": int(events.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        os.rmdir(self.path)


def product_pass_child(dev: str, verify: bool) -> None:
    """In the cgroup: the first boot's header + data pass on ``dev``; prints one JSON line."""
    from encryptrootfs import luks2
    from encryptrootfs.boot import volume
    from encryptrootfs.log import setup_logging

    setup_logging(False)
    key = bytearray(os.urandom(64))  # stays in this process, like the first boot's key
    try:
        start = time.monotonic()
        slot = luks2.reencrypt_encrypt_init(
            dev, key, uuid=str(uuid.uuid4()), reduce_device_size=REDUCE, sector_size=4096
        )
        header_s = time.monotonic() - start
        start = time.monotonic()
        volume.data_pass(dev, key)
        pass_s = time.monotonic() - start
        self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # The cgroup's peak now, before the verification below adds e2fsck's memory to it.
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        peak_file = CGROUP_ROOT / group.lstrip("/") / "memory.peak"
        pass_peak = int(peak_file.read_text()) / MIB if peak_file.exists() else None
        fsck = None
        if verify:
            mapped = luks2.open_device(dev, "erfsbenchverify", key, keyslot=slot)
            try:
                fsck = sh("e2fsck", "-fn", mapped, check=False).returncode
            finally:
                luks2.close_device("erfsbenchverify")
    finally:
        key[:] = bytes(len(key))
    print(
        json.dumps(
            {
                "header_s": header_s,
                "pass_s": pass_s,
                "python_maxrss_mib": self_kib / 1024,
                "cryptsetup_maxrss_mib": child_kib / 1024,
                "fsck_rc": fsck,
                "pass_cgroup_peak_mib": pass_peak,
            }
        )
    )


def product_pass(dev: str, label: str, *, verify: bool = False) -> dict[str, Any]:
    drop_caches()
    group = Cgroup(f"erfsbench-{label}")
    argv = [sys.executable, __file__, "product-child", dev, "1" if verify else "0"]
    done = group.run(argv, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"data pass on {dev} failed: {done.stderr[-2000:]}")
    sys.stderr.write(done.stderr)
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out.update(group.summary())
    group.remove()
    if out.get("pass_cgroup_peak_mib") is not None:
        out["cgroup_peak_mib"] = out["pass_cgroup_peak_mib"]
    # What the data pass itself says it encrypted (the header area is not part of it).
    said = re.search(r"encryption finished: (\d+) MiB in", done.stderr)
    mib = int(said.group(1)) if said else (size_bytes(dev) - REDUCE) / MIB
    out.update(mib=mib, mib_s=mib / out["pass_s"])
    out["peak_rss_mib"] = out["python_maxrss_mib"] + out["cryptsetup_maxrss_mib"]
    return out


def make_data_fs(dev: str, data_mib: int) -> None:
    """ext4 leaving the last 32 MiB free (as the first boot makes room), ``data_mib`` of files."""
    blocks = (size_bytes(dev) - REDUCE) // 4096
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "benchdata", dev, str(blocks))
    mnt = Path("/mnt/benchdata")
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", dev, str(mnt))
    try:
        chunk = 64
        for i in range(data_mib // chunk):
            sh(
                "dd",
                "if=/dev/zero",
                f"of={mnt}/data{i:03d}.bin",
                "bs=1M",
                f"count={chunk}",
                "status=none",
            )
    finally:
        sh("umount", str(mnt))


def baseline_2016(dev: str, script: str) -> dict[str, Any]:
    drop_caches()
    available = mem_available_mib()
    cap_mib = int(available) - 64
    group = Cgroup("erfsbench-2016", max_bytes=cap_mib * MIB)
    start = time.monotonic()
    done = group.run(["bash", script, dev], timeout=1800)
    seconds = time.monotonic() - start
    out: dict[str, Any] = {
        "rc": done.returncode,
        "seconds": seconds,
        "mem_available_mib": available,
        "cap_mib": cap_mib,
    }
    for line in done.stdout.splitlines():
        if line.startswith("B16 "):
            out.update(dict(tok.split("=", 1) for tok in line[4:].split() if "=" in tok))
    out["stderr_tail"] = done.stderr[-600:]
    out.update(group.summary())
    # tmpfs pages stay charged after the copy was killed: the script's cleanup may not have run.
    sh("umount", "/mnt/b16tmp", check=False)
    sh("umount", "/mnt/b16src", check=False)
    group.remove()
    return out


def _dm_io(dev: str) -> dict[str, int]:
    """Sectors read and written on ``dev`` so far (/sys/block/*/stat): the I/O a pass caused."""
    fields = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    return {
        "read_sectors": int(fields[2]),
        "reads": int(fields[0]),
        "write_sectors": int(fields[6]),
        "writes": int(fields[4]),
    }


def timed(
    argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``argv`` once: wall seconds, the child's user/system CPU seconds, exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False, env=env)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": seconds,
        "rc": done.returncode,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "err": done.stderr.decode(errors="replace")[-400:],
    }


def _with_io(
    dev: str, argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    before = _dm_io(dev)
    out = timed(argv, stdin, env)
    after = _dm_io(dev)
    out["read_mib"] = (after["read_sectors"] - before["read_sectors"]) * 512 / MIB
    out["write_mib"] = (after["write_sectors"] - before["write_sectors"]) * 512 / MIB
    out["ios"] = after["reads"] + after["writes"] - before["reads"] - before["writes"]
    return out


def engine_limits(dev: str) -> dict[str, Any]:
    """What dm-crypt does in this guest on ``dev``: write, read, and the in-place copy (read the
    plain block, write it encrypted at the same offset: the data pass's work without any of its
    crash safety), plus cryptsetup's own cipher benchmark (the kernel crypto API from user space,
    no disk)."""
    name = "erfsbenchlim"
    sh(
        "cryptsetup",
        "open",
        "--type",
        "plain",
        "--cipher",
        CIPHER[0],
        "--key-size",
        CIPHER[1],
        "--sector-size",
        "4096",
        "--key-file",
        "/dev/urandom",
        "--keyfile-size",
        "64",
        dev,
        name,
    )
    mapped = f"/dev/mapper/{name}"
    count = str(size_bytes(mapped) // (4 * MIB))
    out: dict[str, Any] = {"mib": int(count) * 4}
    try:
        for label, argv in (
            (
                "write",
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={mapped}",
                    "bs=4M",
                    f"count={count}",
                    "oflag=direct",
                    "conv=fsync",
                    "status=none",
                ],
            ),
            (
                "read",
                [
                    "dd",
                    f"if={mapped}",
                    "of=/dev/null",
                    "bs=4M",
                    f"count={count}",
                    "iflag=direct",
                    "status=none",
                ],
            ),
            (
                "inplace",
                [
                    "dd",
                    f"if={dev}",
                    f"of={mapped}",
                    "bs=4M",
                    f"count={count}",
                    "iflag=direct",
                    "oflag=direct",
                    "conv=fsync,notrunc",
                    "status=none",
                ],
            ),
        ):
            drop_caches()
            result = _with_io(dev, argv)
            result["mib_s"] = out["mib"] / result["seconds"]
            out[label] = result
    finally:
        sh("cryptsetup", "close", name)
    bench = sh(
        "cryptsetup", "benchmark", "--cipher", CIPHER[0], "--key-size", CIPHER[1], check=False
    )
    speeds = re.search(r"aes-xts\s+\d+b\s+([\d.]+) MiB/s\s+([\d.]+) MiB/s", bench.stdout)
    if speeds:
        out["cryptsetup_benchmark_mib_s"] = {
            "encrypt": float(speeds.group(1)),
            "decrypt": float(speeds.group(2)),
        }
    out["openssl_xts_mib_s"] = openssl_xts()
    # The same with OpenSSL's AES-NI code switched off: under TCG, emulated AES instructions
    # can be slower than table-based AES; on real hardware AES-NI is the fast path.
    out["openssl_xts_no_aesni_mib_s"] = openssl_xts(NO_AESNI)
    out["cpu_has_aes"] = " aes " in Path("/proc/cpuinfo").read_text()
    return out


# OPENSSL_ia32cap mask that clears the AES-NI (bit 57) and PCLMULQDQ (bit 33) capability bits.
NO_AESNI = {"OPENSSL_ia32cap": "~0x200000200000000"}


def openssl_xts(env: dict[str, str] | None = None) -> float | None:
    """OpenSSL's AES-256-XTS on 4096-byte blocks, one thread: the cipher that cryptsetup (linked
    against libcrypto) uses when it encrypts in its own process."""
    done = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "-bytes", "4096", "-evp", "aes-256-xts"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    found = re.search(r"^AES-256-XTS\s+([\d.]+)k", done.stdout, re.MULTILINE | re.IGNORECASE)
    return float(found.group(1)) * 1000 / MIB if found else None


def variant_pass(dev: str, variant: dict[str, Any]) -> dict[str, Any]:
    """One encryption of ``dev`` as the first boot does it (header with a pending encryption,
    32 MiB data shift, 4096-byte sectors), the data pass run with the variant's options."""
    sh("wipefs", "-qa", dev, check=False)
    key = os.urandom(64)
    init = [
        "cryptsetup",
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--init-only",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        "-",
        "--reduce-device-size",
        str(REDUCE),
        "--sector-size",
        "4096",
        *variant.get("init", []),
        dev,
    ]
    out: dict[str, Any] = {
        "name": variant["name"],
        "online": bool(variant.get("online")),
        "options": [*variant.get("init", []), *variant.get("resume", [])],
    }
    env = {**os.environ, **variant["env"]} if variant.get("env") else None
    done = timed(init, key)
    if done["rc"] != 0:
        out.update(ok=False, stage="init", err=done["err"])
        return out
    pending = sh("cryptsetup", "luksDump", dev, check=False).stdout
    for field in ("Resilience", "Direction", "Hash"):
        found = re.search(rf"^\s*{field}:\s*(\S+)", pending, re.MULTILINE)
        out[field.lower()] = found.group(1) if found else None
    target = [dev]
    if variant.get("online"):
        opened = timed(["cryptsetup", "open", "--key-file", "-", dev, "erfsbenchon"], key)
        if opened["rc"] != 0:
            out.update(ok=False, stage="open", err=opened["err"])
            return out
        target = ["--active-name", "erfsbenchon"]
    drop_caches()
    resume = [
        "cryptsetup",
        "reencrypt",
        "--resume-only",
        "--batch-mode",
        "--key-file",
        "-",
        *variant.get("resume", []),
        *target,
    ]
    try:
        done = _with_io(dev, resume, key, env)
    finally:
        if variant.get("online"):
            sh("cryptsetup", "close", "erfsbenchon", check=False)
    dump = sh("cryptsetup", "luksDump", dev, check=False).stdout
    mib = (size_bytes(dev) - REDUCE) / MIB
    out.update(
        done,
        ok=done["rc"] == 0 and "reencrypt" not in dump.split("Keyslots:")[-1][:400],
        stage="resume",
        mib=mib,
        mib_s=mib / done["seconds"],
    )
    return out


VARIANTS: tuple[dict[str, Any], ...] = (
    {"name": "product"},
    # The hotzone of a data-shift encryption is the shift itself: same I/O count if ignored.
    {"name": "hotzone 1 MiB", "resume": ["--hotzone-size", "1M"]},
    {"name": "hotzone 64 MiB", "resume": ["--hotzone-size", "64M"]},
    # The resilience is fixed when the header is written (a resume refuses another one); the
    # luksDump after the init says which one cryptsetup took (datashift: the others are not
    # offered for an encryption that moves the data, as tried in development).
    {"name": "resilience checksum", "init": ["--resilience", "checksum"]},
    {"name": "resilience datashift-checksum", "init": ["--resilience", "datashift-checksum"]},
    {"name": "online (opened with dm-crypt first)", "online": True},
    # Diagnostic, never for the product: where cryptsetup's own cipher spends its time.
    {"name": "product, OpenSSL without AES-NI", "env": NO_AESNI},
    {"name": "product again"},
)


def variants(dev: str, names: list[str] | None) -> None:
    zero_fill(dev)
    emit("engine", **engine_limits(dev))
    for variant in VARIANTS:
        if names is None or variant["name"] in names:
            emit("variant", **variant_pass(dev, variant))
    emit("engine-after", **engine_limits(dev))


def main(config: dict[str, Any]) -> None:
    from encryptrootfs.log import setup_logging

    setup_logging(False)
    emit(
        "guest",
        mem_total_mib=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MIB,
        cpus=os.cpu_count(),
        cryptsetup=sh("cryptsetup", "--version").stdout.strip(),
        kernel=os.uname().release,
    )
    for item in config["throughput"]:
        dev = device(item["serial"])
        fill_s = zero_fill(dev)
        raw1 = raw_write(dev)
        product = product_pass(dev, f"tp{item['size_mib']}")
        raw2 = raw_write(dev)
        emit(
            "throughput",
            size_mib=item["size_mib"],
            fill_s=fill_s,
            raw=[raw1, raw2],
            product=product,
        )
    if config.get("variants"):
        variants(device(config["variants"]["serial"]), config["variants"].get("names"))
    mem = config.get("memory")
    if mem:
        dev = device(mem["serial"])
        zero_fill(dev)
        start = time.monotonic()
        make_data_fs(dev, mem["data_mib"])
        emit(
            "memory-data",
            size_mib=mem["size_mib"],
            data_mib=mem["data_mib"],
            write_s=time.monotonic() - start,
        )
        emit(
            "baseline-2016",
            size_mib=mem["size_mib"],
            data_mib=mem["data_mib"],
            **(b16 := baseline_2016(dev, config["baseline_script"])),
        )
        if b16.get("result") == "ok":  # it fit in memory: the disk is LUKS1 now, start over
            sh("wipefs", "-a", dev)
            make_data_fs(dev, mem["data_mib"])
        product = product_pass(dev, "mem", verify=True)
        emit("memory", size_mib=mem["size_mib"], data_mib=mem["data_mib"], product=product)


if __name__ == "__main__":
    if sys.argv[1] == "product-child":
        product_pass_child(sys.argv[2], sys.argv[3] == "1")
    else:
        main(json.loads(sys.argv[1]))
