"""The native piece (issue 19): the product on the host's real CPU, no guest.

Two measures, each side by side with its peer in one run, rounds alternating:

- the **data pass** as the first boot runs it (``encryptrootfs.luks2``: header with a 32 MiB
  data shift and 4096-byte sectors, the token, the keyslot test, ``reencrypt_resume``) on an
  image file, against a plain read-and-write of the same bytes with fsync on the same
  filesystem (``dd conv=fsync`` to a new file);
- the **unlock** as a whole process: ``encryptrootfs token verify`` (Python, imports, IMDSv2,
  KMS Decrypt, keyslot test) against the KMS and IMDS emulators on 127.0.0.1, against
  ``cryptsetup open --test-passphrase`` of an Argon2id keyslot at cryptsetup's defaults and
  against Clevis + Tang (Debian packages, tangd behind socat on 127.0.0.1) on a copy of the
  same header.

Every measured command is its own process, waited with ``os.wait4`` (wall time, user and system
CPU of its whole tree) and run under GNU time for the peak RSS of the largest process in the
tree. Scratch images live in :data:`WORKDIR` and are deleted afterwards.

The product's data pass runs in a child (``python -m bench.native data-pass IMAGE``, the key on
stdin) so that its CPU and memory are the product's alone, not the bench's.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Optional

from .common import MIB

WORKDIR = Path(os.environ.get("ENCRYPTROOTFS_BENCH_NATIVE_WORK", "/var/tmp/erfs-bench-native"))  # noqa: S108
# What the first boot frees for the header (encryptrootfs.boot.plan_record.REDUCE_DEVICE_SIZE).
SHIFT = 32 * MIB
# The first boot's choice for any filesystem with 4 KiB blocks (ext4, xfs).
SECTOR_SIZE = 4096
REGION = "eu-west-1"
DEBIAN_PACKAGES = ("clevis", "clevis-luks", "tang", "jose", "socat", "time", "strace")
TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
# GNU time (Debian package `time`): the peak RSS of a child not forked from the bench.
GNU_TIME = "/usr/bin/time"
SYNCED_COPY = """import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
step = 16 * 1024 * 1024
with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
    done = 0
    while done < n:
        block = f.read(min(1024 * 1024, n - done))
        g.write(block)
        done += len(block)
        if done % step == 0 or done == n:
            os.fsync(g.fileno())
"""
CLEVIS_UNLOCK = """set -e
. clevis-luks-common-functions
pt=$(clevis_luks_unlock_device "$1")
printf '%s' "$pt" | cryptsetup open --test-passphrase $2 --key-file - "$1"
"""


@dataclass(frozen=True)
class Plan:
    sizes_mib: tuple[int, ...]
    rounds: int  # data pass: alternating rounds per size
    unlock_rounds: int
    variant_mib: int  # the one size the data-pass variants (item 3) run at


FULL = Plan((256, 512, 1024, 2048, 4096), 5, 9, 1024)
SMALL = Plan((64, 128), 1, 2, 256)


# -- one process, measured ---------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    user_s: float
    sys_s: float
    max_rss_mib: float  # the largest RSS of the process and its waited descendants
    stdout: str
    stderr: str
    started: float  # time.time() just before the fork

    def summary(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "user_s": self.user_s,
            "sys_s": self.sys_s,
            "max_rss_mib": self.max_rss_mib,
        }


class BenchError(RuntimeError):
    pass


def measure(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
) -> Proc:
    """Run ``argv`` (secrets on stdin only) and wait for it with ``os.wait4``.

    The peak RSS comes from GNU time's ``%M``, not from this wait4: a child spawned by this
    (large) Python process inherits its RSS high-water mark at exec (vfork shares the mm), so
    wait4's ru_maxrss would report the bench's own memory for any small command.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as rss,
    ):
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", rss.name, "--", *argv],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
        )
        assert proc.stdin is not None
        with suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        result = Proc(
            argv=tuple(argv),
            returncode=proc.returncode,
            seconds=seconds,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            max_rss_mib=parse_time_rss_kib(rss.read()) / 1024,
            stdout=_read_all(out),
            stderr=_read_all(err),
            started=started,
        )
    if check and result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise BenchError(f"`{' '.join(argv)}` exited {result.returncode}: {last[0]}")
    return result


def parse_time_rss_kib(text: str) -> float:
    """The ``%M`` (KiB) GNU time wrote last; it writes "Command exited with non-zero status N"
    or "Command terminated by signal N" before it."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[-1].strip().isdigit():
        raise BenchError(f"GNU time wrote no peak RSS: {text!r}")
    return float(lines[-1])


def _read_all(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


# -- statistics and parsers (unit-tested) -------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    def text(self, unit: str = "", digits: int = 2) -> str:
        return (
            f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}-{self.high:.{digits}f}, "
            f"n={self.n})"
        )


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def spread_of(raw: Mapping[str, Any]) -> Spread:
    return Spread(float(raw["median"]), float(raw["low"]), float(raw["high"]), int(raw["n"]))


@dataclass(frozen=True)
class SyscallRow:
    name: str
    seconds: float
    calls: int
    errors: int


_STRACE_ROW = re.compile(
    r"^\s*(?P<pct>[\d.]+)\s+(?P<seconds>[\d.]+)\s+(?P<usecs>\d+)\s+(?P<calls>\d+)"
    r"\s+(?:(?P<errors>\d+)\s+)?(?P<name>[a-z_0-9]+)\s*$"
)


def parse_strace_summary(text: str) -> list[SyscallRow]:
    """The rows of ``strace -c`` (``% time seconds usecs/call calls errors syscall``)."""
    rows = []
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m and m.group("name") != "total":
            rows.append(
                SyscallRow(
                    m.group("name"),
                    float(m.group("seconds")),
                    int(m.group("calls")),
                    int(m.group("errors") or 0),
                )
            )
    return rows


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def parse_importtime(text: str) -> dict[str, float]:
    """Self time of ``python -X importtime`` by top-level package, in seconds.

    Packages other than encryptrootfs, botocore, urllib3, dateutil and jmespath are summed as
    ``stdlib and others``; ``total`` is the sum of all self times.
    """
    mine = ("encryptrootfs", "botocore", "urllib3", "dateutil", "jmespath", "tomli", "six")
    out: dict[str, float] = {}
    total = 0.0
    for line in text.splitlines():
        m = _IMPORT_LINE.match(line)
        if not m:
            continue
        seconds = int(m.group(1)) / 1e6
        top = m.group(4).split(".", 1)[0]
        key = top if top in mine else "stdlib and others"
        out[key] = out.get(key, 0.0) + seconds
        total += seconds
    out["total"] = total
    return out


def slowest_imports(text: str, n: int) -> list[tuple[str, float]]:
    """The ``n`` modules with the largest self time in a ``-X importtime`` trace (seconds)."""
    rows = []
    for line in text.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            rows.append((m.group(4), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:n]


_OPENSSL_SPEED = re.compile(r"^(?P<name>\S+)\s+(?P<values>(?:[\d.]+k\s*)+)$")


def parse_openssl_speed(text: str) -> Optional[float]:
    """MiB/s of the last (largest block) column of ``openssl speed -evp ...``; None if absent.

    openssl prints 1000s of bytes per second ("123456.78k").
    """
    for line in text.splitlines():
        m = _OPENSSL_SPEED.match(line.strip())
        if m:
            last = m.group("values").split()[-1]
            return float(last.rstrip("k")) * 1000 / MIB
    return None


_CS_BENCH = re.compile(r"^\s*aes-xts\s+(\d+)b\s+([\d.]+)\s+MiB/s\s+([\d.]+)\s+MiB/s\s*$")


def parse_cryptsetup_benchmark(text: str) -> Optional[dict[str, float]]:
    """Encryption and decryption MiB/s of ``cryptsetup benchmark -c aes-xts-plain64``."""
    for line in text.splitlines():
        m = _CS_BENCH.match(line)
        if m:
            return {
                "key_bits": float(m.group(1)),
                "encrypt": float(m.group(2)),
                "decrypt": float(m.group(3)),
            }
    return None


def unlock_timeline(
    started: float,
    ended: float,
    imds_times: Sequence[float],
    kms_times: Sequence[float],
) -> dict[str, float]:
    """Where one ``token verify`` spent its time, from the emulators' request log (wall clock).

    ``before_imds``: interpreter start, imports, config, header read, until the first IMDS
    request; ``imds``: first to last IMDS request (token, region, instance id, credentials);
    ``client_and_kms``: botocore's client (service model, endpoint rules), signing and the
    Decrypt round trip, until the emulator logged the answer; ``keyslot_and_exit``: the keyslot
    test through cryptsetup and the interpreter's exit.
    """
    if not imds_times or not kms_times:
        raise ValueError("the run made no IMDS or no KMS request")
    first_imds, last_imds = min(imds_times), max(t for t in imds_times if t <= max(kms_times))
    kms = max(kms_times)
    return {
        "before_imds_s": first_imds - started,
        "imds_s": last_imds - first_imds,
        "client_and_kms_s": kms - last_imds,
        "keyslot_and_exit_s": ended - kms,
        "total_s": ended - started,
    }


_TRACE_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<t>\d+\.\d+)\s+(?P<rest>.*)$")
_TRACE_EXEC = re.compile(r'^execve\("(?P<path>[^"]*)", \[(?P<args>[^\]]*)\]')
_TRACE_PORT = re.compile(r"^connect\(.*sin_port=htons\((?P<port>\d+)\)")
_TRACE_EXIT = re.compile(r"^\+\+\+ exited with (?P<rc>\d+) \+\+\+")


@dataclass(frozen=True)
class TraceEvent:
    pid: int
    time: float
    kind: str  # exec | connect | exit
    detail: str  # exec: the argv joined; connect: the port; exit: the exit code


def parse_strace_events(text: str) -> list[TraceEvent]:
    """execve, connect and exits from ``strace -f -ttt -e trace=execve,connect``."""
    events = []
    for line in text.splitlines():
        m = _TRACE_LINE.match(line)
        if not m:
            continue
        pid, t, rest = int(m.group("pid")), float(m.group("t")), m.group("rest")
        if (e := _TRACE_EXEC.match(rest)) and rest.rstrip().endswith("= 0"):
            args = " ".join(a.strip().strip('"') for a in e.group("args").split(","))
            events.append(TraceEvent(pid, t, "exec", args))
        elif p := _TRACE_PORT.match(rest):
            events.append(TraceEvent(pid, t, "connect", p.group("port")))
        elif x := _TRACE_EXIT.match(rest):
            events.append(TraceEvent(pid, t, "exit", x.group("rc")))
    return events


def trace_timeline(events: Sequence[TraceEvent], imds_port: int, kms_port: int) -> dict[str, float]:
    """Phases of one traced ``token verify`` from its own system calls, in seconds:
    ``to_first_command`` (interpreter start, imports, config), ``header_reads`` (cryptsetup
    runs before the first IMDS connection), ``to_imds`` (what lies between: botocore's import,
    the provider), ``imds_to_kms`` (IMDS requests, botocore's client and credentials, until the
    KMS connection), ``kms_to_keyslot`` (signing, the Decrypt round trip, until cryptsetup
    starts the keyslot test), ``keyslot`` (that cryptsetup's run) and ``exit`` (the
    interpreter's exit after it)."""
    if not events:
        raise ValueError("empty trace")
    start, main = events[0].time, events[0].pid
    imds = [e.time for e in events if e.kind == "connect" and e.detail == str(imds_port)]
    kms = [e.time for e in events if e.kind == "connect" and e.detail == str(kms_port)]
    if not imds or not kms:
        raise ValueError("the trace has no IMDS or no KMS connection")
    execs = [e for e in events if e.kind == "exec" and e.pid != main]
    before = [e for e in execs if e.time < imds[0]]
    test = next(e for e in execs if "--test-passphrase" in e.detail and e.time > kms[0])
    test_end = next(e.time for e in events if e.kind == "exit" and e.pid == test.pid)
    header_end = max(
        (next(x.time for x in events if x.kind == "exit" and x.pid == e.pid) for e in before),
        default=before[0].time if before else start,
    )
    first = before[0].time if before else imds[0]
    end = max(e.time for e in events if e.kind == "exit" and e.pid == main)
    return {
        "to_first_command_s": first - start,
        "header_reads_s": header_end - first,
        "to_imds_s": imds[0] - header_end,
        "imds_to_kms_s": kms[0] - imds[0],
        "kms_to_keyslot_s": test.time - kms[0],
        "keyslot_s": test_end - test.time,
        "exit_s": end - test_end,
        "total_s": end - start,
        "commands_before_imds": float(len(before)),
    }


# -- the data pass ------------------------------------------------------------------------------


def _fill(path: Path, size: int) -> None:
    """``size`` bytes of random data (not sparse: the pass must read real blocks), on disk and
    out of the page cache, so that both sides start from the same cold cache."""
    block = secrets.token_bytes(8 * MIB)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    _drop_cache(path)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _data_pass_child(
    image: Path, extra: Sequence[str] = (), *, stdin_key: bytes
) -> tuple[Proc, dict[str, Any]]:
    argv = [sys.executable, "-m", "bench.native", "data-pass", str(image), *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = measure(argv, stdin=stdin_key, env=env)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def data_pass_main(argv: Sequence[str]) -> int:
    """The child: the first boot's luks2 calls on ``image``, key on stdin; JSON on stdout."""
    import argparse

    from encryptrootfs import luks2

    parser = argparse.ArgumentParser(prog="python -m bench.native data-pass")
    parser.add_argument("image")
    parser.add_argument("--stop-after", choices=("token", "data"), default="data")
    parser.add_argument("--shift-mib", type=int, default=SHIFT // MIB)
    parser.add_argument("--sector-size", type=int, default=SECTOR_SIZE)
    args = parser.parse_args(argv)
    key = bytearray(sys.stdin.buffer.read())
    times: dict[str, Any] = {}

    def children() -> tuple[float, float]:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime, r.ru_stime

    t = time.perf_counter()
    slot = luks2.reencrypt_encrypt_init(
        args.image,
        key,
        uuid=str(uuid.uuid4()),
        reduce_device_size=args.shift_mib * MIB,
        sector_size=args.sector_size,
    )
    times["init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # What store_token() does: prove the keyslot, then import a token of the product's size.
    if not luks2.test_keyslot(args.image, key, slot):
        raise SystemExit("the new keyslot does not open with the key")
    token = {
        "type": "encryptrootfs",
        "keyslots": [str(slot)],
        "version": 1,
        "wrapped_key": secrets.token_bytes(184).hex(),
        "bench": "a stand-in of the product token's size, never unwrapped",
    }
    luks2.import_token(args.image, token)
    times["token_s"] = time.perf_counter() - t
    if args.stop_after == "data":
        u0, s0 = children()
        t = time.perf_counter()
        luks2.reencrypt_resume(args.image, key, force_offline=True)
        times["resume_s"] = time.perf_counter() - t
        u1, s1 = children()
        times["resume_user_s"], times["resume_sys_s"] = u1 - u0, s1 - s0
    key[:] = bytes(len(key))
    times["cryptsetup_max_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    times["self_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(times))
    return 0


def _plain_copy(src: Path, dst: Path, data_mib: int) -> Proc:
    with suppress(FileNotFoundError):
        dst.unlink()
    argv = ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={data_mib}", "conv=fsync"]
    proc = measure([*argv, "status=none"])
    dst.unlink()
    return proc


def _inplace_copy(image: Path, data_mib: int) -> Proc:
    """The data shift's own move without encryption: the same bytes 32 MiB back in the file."""
    return measure(
        [
            "dd",
            f"if={image}",
            f"of={image}",
            "bs=1M",
            f"skip={SHIFT // MIB}",
            f"count={data_mib}",
            "conv=notrunc,fsync",
            "status=none",
        ]
    )


def run_data_pass(plan: Plan, work: Path) -> dict[str, Any]:
    image, copy = work / "data.img", work / "copy.img"
    key = secrets.token_bytes(64)
    sizes = []
    sides = ("product", "plain", "inplace")
    for size_mib in plan.sizes_mib:
        data_mib = size_mib - SHIFT // MIB
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for rnd in range(plan.rounds):
            for side in sides[rnd % 3 :] + sides[: rnd % 3]:  # each side leads in turn
                _fill(image, size_mib * MIB)
                if side == "product":
                    p, inner = _data_pass_child(image, stdin_key=key)
                    entry = {**p.summary(), **inner, "mib_s": data_mib / inner["resume_s"]}
                    entry["mib_s_whole"] = data_mib / p.seconds
                else:
                    p = (
                        _plain_copy(image, copy, data_mib)
                        if side == "plain"
                        else _inplace_copy(image, data_mib)
                    )
                    entry = {**p.summary(), "mib_s": data_mib / p.seconds}
                runs[side].append(entry)
                print(
                    f"bench: native data pass {size_mib} MiB round {rnd + 1} {side}: "
                    f"{p.seconds:.2f} s",
                    flush=True,
                )
        sizes.append({"size_mib": size_mib, "data_mib": data_mib, **runs})
    image.unlink(missing_ok=True)
    return {"sizes": sizes}


def run_variants(plan: Plan, work: Path) -> dict[str, Any]:
    """Item 3: what the data pass waits on, and whether a mode without less crash safety helps."""
    image = work / "variant.img"
    size = plan.variant_mib * MIB
    data_mib = plan.variant_mib - SHIFT // MIB
    key = secrets.token_bytes(64)
    out: dict[str, Any] = {"size_mib": plan.variant_mib, "runs": []}
    resume = [
        "cryptsetup",
        "reencrypt",
        "--resume-only",
        "--batch-mode",
        "--force-offline-reencrypt",
        "--key-file",
        "-",
    ]
    variants: list[tuple[str, list[str], list[str]]] = [
        ("product (32 MiB shift, 4096-byte sectors)", [], []),
        ("hotzone 128 MiB", [], ["--hotzone-size", "128M"]),
        ("shift 128 MiB", ["--shift-mib", "128"], []),
        ("512-byte sectors", ["--sector-size", "512"], []),
        ("resilience datashift-checksum", [], ["--resilience", "datashift-checksum"]),
        ("--use-directio", [], ["--use-directio"]),
    ]
    for rnd in range(plan.rounds):
        for name, init_args, resume_args in variants if rnd % 2 == 0 else variants[::-1]:
            _fill(image, size)
            try:
                _data_pass_child(image, ["--stop-after", "token", *init_args], stdin_key=key)
            except BenchError as exc:
                out["runs"].append({"name": name, "rc": 1, "mib_s": None, "err": str(exc)[-300:]})
                image.unlink()
                continue
            p = measure([*resume, *resume_args, str(image)], stdin=key, check=False)
            entry: dict[str, Any] = {"name": name, **p.summary(), "rc": p.returncode}
            entry["mib_s"] = data_mib / p.seconds if p.returncode == 0 else None
            if p.returncode:
                entry["err"] = (p.stderr.strip().splitlines() or [""])[-1]
            out["runs"].append(entry)
            print(f"bench: native variant {name}: {p.seconds:.2f} s rc {p.returncode}", flush=True)
        # Peers closer to what the pass does: the same bytes moved 32 MiB back in the same
        # file (no new blocks), and a copy with an fsync after every 16 MiB (its sync cadence).
        for name, argv in (
            (
                "peer: dd in place, 32 MiB back",
                [
                    "dd",
                    f"if={image}",
                    f"of={image}",
                    "bs=1M",
                    f"skip={SHIFT // MIB}",
                    f"count={data_mib}",
                    "conv=notrunc,fsync",
                    "status=none",
                ],
            ),
            (
                "peer: copy, fsync every 16 MiB",
                [
                    sys.executable,
                    "-c",
                    SYNCED_COPY,
                    str(image),
                    str(work / "copy.img"),
                    str(data_mib * MIB),
                ],
            ),
        ):
            _fill(image, size)
            p = measure(argv)
            out["runs"].append(
                {"name": name, **p.summary(), "rc": 0, "mib_s": data_mib / p.seconds}
            )
            (work / "copy.img").unlink(missing_ok=True)
    # Each variant once more under strace: its I/O sizes and syncs (not timed).
    out["io_by_variant"] = {}
    if shutil.which("strace"):
        for name, init_args, resume_args in variants:
            _fill(image, size)
            try:
                _data_pass_child(image, ["--stop-after", "token", *init_args], stdin_key=key)
            except BenchError:
                continue
            trace = work / "strace-io.txt"
            measure(
                [
                    "strace",
                    "-f",
                    "-e",
                    "trace=openat,pread64,pwrite64,preadv,pwritev,preadv2,pwritev2,read,write,fsync,fdatasync",
                    "-e",
                    "abbrev=all",
                    "-e",
                    "read=none",
                    "-o",
                    str(trace),
                    *resume,
                    *resume_args,
                    str(image),
                ],
                stdin=key,
                check=False,
            )
            out["io_by_variant"][name] = io_size_histogram(trace.read_text(), str(image))
    # The product's resume under strace -c: syscalls, syncs and I/O sizes.
    if shutil.which("strace"):
        _fill(image, size)
        _data_pass_child(image, ["--stop-after", "token"], stdin_key=key)
        summary = work / "strace-c.txt"
        p = measure(["strace", "-f", "-c", "-o", str(summary), *resume, str(image)], stdin=key)
        rows = parse_strace_summary(summary.read_text())
        out["strace"] = {"seconds": p.seconds, "rows": [asdict(r) for r in rows]}
    image.unlink(missing_ok=True)
    # The cipher alone, both engines: OpenSSL in user space (what cryptsetup's offline
    # reencryption uses) and the kernel's (dm-crypt's), each on one thread.
    ossl = measure(
        ["openssl", "speed", "-evp", "aes-256-xts", "-seconds", "2", "-bytes", "65536"], check=False
    )
    out["openssl_xts_mib_s"] = parse_openssl_speed(ossl.stdout)
    kb = measure(["cryptsetup", "benchmark", "-c", "aes-xts-plain64", "-s", "512"], check=False)
    out["kernel_xts"] = parse_cryptsetup_benchmark(kb.stdout)
    return out


_IO_CALL = re.compile(
    r"(?P<call>pread64|pwrite64|preadv2?|pwritev2?|read|write|fsync|fdatasync)\("
    r"(?P<args>.*)\)\s*=\s*(?P<rc>-?\d+)"
)


_OPENED = re.compile(r"\) = \d+$")


def io_size_histogram(text: str, image: str = "") -> dict[str, dict[str, int]]:
    """``{call: {bytes: count}}`` of an ``strace -e trace=pread64,...`` log (sync calls: size 0);
    with ``image``, also ``{"opens": {"all": n, "O_DIRECT": m}}`` of its openat calls."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if image and f'openat(AT_FDCWD, "{image}", ' in line and _OPENED.search(line):
            opens = out.setdefault("opens", {"all": 0, "O_DIRECT": 0})
            opens["all"] += 1
            opens["O_DIRECT"] += "O_DIRECT" in line
            continue
        m = _IO_CALL.search(line)
        if not m:
            continue
        call = m.group("call")
        size = "0" if call in ("fsync", "fdatasync") else m.group("rc")
        if call in ("read", "write") and int(m.group("rc")) < 65536:
            continue  # the key, JSON and progress lines, not the data
        bucket = out.setdefault(call, {})
        bucket[size] = bucket.get(size, 0) + 1
    return out


# -- the unlock ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tang_server(work: Path) -> Iterator[str]:
    """tangd on 127.0.0.1 behind socat (systemd's socket activation, without systemd)."""
    keys = work / "tang-db"
    keys.mkdir(exist_ok=True)
    measure([TANGD_KEYGEN, str(keys)])
    port = _free_port()
    socat = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{TANGD} {keys}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        socat.send_signal(signal.SIGTERM)
        socat.wait(10)


def install_debian_packages() -> None:
    missing = [p for p in DEBIAN_PACKAGES if not _dpkg_installed(p)]
    if not missing:
        return
    print(f"bench: installing {' '.join(missing)} (Debian packages)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    measure(["apt-get", "update", "-qq"], env=env)
    measure(["apt-get", "install", "-y", "-q", *missing], env=env)


def _dpkg_installed(package: str) -> bool:
    p = measure(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
    return p.returncode == 0 and p.stdout.endswith("installed")


def _product_argv(config: Path) -> list[str]:
    script = Path(sys.executable).parent / "encryptrootfs"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "encryptrootfs"]
    return [*head, "--config", str(config)]


def _aws_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    return env


def run_unlock(plan: Plan, work: Path) -> dict[str, Any]:
    from encryptrootfs import luks2
    from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator

    install_debian_packages()
    image, clevis_image = work / "unlock.img", work / "unlock-clevis.img"
    with image.open("wb") as f:
        f.truncate(64 * MIB)
    passphrase = secrets.token_hex(16).encode()
    # cryptsetup's defaults: LUKS2, Argon2id, benchmarked for 2 s and at most 1 GiB.
    measure(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--key-file",
            "-",
            str(image),
        ],
        stdin=passphrase,
    )
    argon = luks2.read_header(str(image)).keyslots["0"]
    out: dict[str, Any] = {
        "argon2": {
            "kdf": argon.kdf_type,
            "memory_kib": argon.memory,
            "time": argon.time_cost,
            "threads": argon.parallel,
        },
    }
    env = _aws_env()
    with (
        ImdsEmulator(region=REGION) as imds,
        KmsEmulator(region=REGION) as kms,
        tang_server(work) as tang_url,
    ):
        kms.create_key(alias="encryptrootfs-bench")
        config = work / "config.toml"
        config.write_text(
            "[providers.aws_kms]\n"
            'key_id = "alias/encryptrootfs-bench"\n'
            f'endpoint_url = "{kms.url}"\n'
            f'imds_endpoint = "{imds.url}"\n'
        )
        product = _product_argv(config)
        measure([*product, "enroll", str(image), "--key-file", "-"], stdin=passphrase, env=env)
        shutil.copyfile(image, clevis_image)
        measure(
            [
                "clevis",
                "luks",
                "bind",
                "-y",
                "-d",
                str(clevis_image),
                "-k",
                "-",
                "tang",
                json.dumps({"url": tang_url}),
            ],
            stdin=passphrase,
        )
        header = luks2.read_header(str(clevis_image))
        clevis_slot = next(
            t["keyslots"][0] for t in header.tokens.values() if t.get("type") == "clevis"
        )
        pk = header.keyslots[clevis_slot]
        out["clevis_keyslot"] = {"kdf": pk.kdf_type, "iterations": pk.iterations}
        ours = luks2.read_header(str(image))
        our_slot = next(
            t["keyslots"][0] for t in ours.tokens.values() if t.get("type") == "encryptrootfs"
        )
        ok = ours.keyslots[our_slot]
        out["product_keyslot"] = {"kdf": ok.kdf_type, "iterations": ok.iterations}
        trimmed_env = {**env, "AWS_DATA_PATH": str(trimmed_botocore_data(work / "aws-data"))}
        cmds = {
            "product": ([*product, "token", "verify", str(image)], b"", env),
            # Item 3: the same command with botocore's data trimmed (AWS_DATA_PATH).
            "product_trimmed_data": (
                [*product, "token", "verify", str(image)],
                b"",
                trimmed_env,
            ),
            "argon2id": (
                [
                    "cryptsetup",
                    "open",
                    "--test-passphrase",
                    "--key-slot",
                    "0",
                    "--key-file",
                    "-",
                    str(image),
                ],
                passphrase,
                None,
            ),
            # clevis-luks-unlock minus device-mapper: its own shell functions find the clevis
            # token, decrypt the JWE through Tang, then the passphrase is tested on the keyslot
            # (clevis-luks-unlock runs `cryptsetup open` there, with no --key-slot).
            "clevis_tang": (
                [
                    "bash",
                    "-c",
                    CLEVIS_UNLOCK,
                    "clevis",
                    str(clevis_image),
                    f"--key-slot={clevis_slot}",
                ],
                b"",
                None,
            ),
            # The same, exactly as clevis-luks-unlock opens: no --key-slot, so cryptsetup tries
            # the header's keyslots in order, the Argon2id passphrase slot first.
            "clevis_tang_any_slot": (
                ["bash", "-c", CLEVIS_UNLOCK, "clevis", str(clevis_image), ""],
                b"",
                None,
            ),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
        timelines = []
        names = list(cmds)
        for rnd in range(plan.unlock_rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:  # rotate
                argv, stdin, cenv = cmds[name]
                imds.clear_log()
                kms.clear_log()
                p = measure(argv, stdin=stdin, env=cenv)
                ended = time.time()
                if name.startswith("product") and "OK" not in p.stdout:
                    raise BenchError(f"token verify did not say OK: {p.stdout!r}")
                if name == "product":
                    if "OK" not in p.stdout:
                        raise BenchError(f"token verify did not say OK: {p.stdout!r}")
                    timelines.append(
                        unlock_timeline(
                            p.started,
                            ended,
                            [r.time for r in imds.requests],
                            [r.time for r in kms.requests if r.action == "Decrypt"],
                        )
                    )
                runs[name].append(p.summary())
            print(f"bench: native unlock round {rnd + 1} done", flush=True)
        out["runs"] = runs
        out["timelines"] = timelines
        # The product's own view: its execve and connect calls, timestamped by strace (filtered
        # in the kernel with seccomp-bpf, so the other calls run untraced).
        traced = []
        for _ in range(3):
            trace = work / "verify-trace.txt"
            measure(
                [
                    "strace",
                    "-f",
                    "-ttt",
                    "--seccomp-bpf",
                    "-e",
                    "trace=execve,connect",
                    "-o",
                    str(trace),
                    *cmds["product"][0],
                ],
                env=env,
            )
            traced.append(
                trace_timeline(parse_strace_events(trace.read_text()), imds.port, kms.port)
            )
        out["traced"] = traced
        # The keyslot test alone: Clevis's PBKDF2 keyslot has the product's cost parameters.
        secret = measure(["clevis", "luks", "pass", "-d", str(clevis_image), "-s", clevis_slot])
        tests = [
            measure(
                [
                    "cryptsetup",
                    "open",
                    "--test-passphrase",
                    "--key-slot",
                    clevis_slot,
                    "--key-file",
                    "-",
                    str(clevis_image),
                ],
                stdin=secret.stdout.encode(),
            )
            for _ in range(5)
        ]
        out["keyslot_test_s"] = asdict(spread([t.seconds for t in tests]))
        out["breakdown"] = unlock_breakdown(plan, image, cmds["product"][0], env, trimmed_env)
    for path in (image, clevis_image):
        path.unlink(missing_ok=True)
    return out


# The KMS operations the product calls (unlock, first boot, enroll, rewrap, kms check).
PRODUCT_KMS_OPERATIONS = ("Decrypt", "GenerateDataKey", "Encrypt", "DescribeKey", "ReEncrypt")


def trim_service_model(model: Mapping[str, Any], keep: Sequence[str]) -> dict[str, Any]:
    """A botocore service model with only the ``keep`` operations and the shapes they reach."""
    shapes: Mapping[str, Any] = model["shapes"]
    operations = {name: op for name, op in model["operations"].items() if name in keep}
    wanted: set[str] = set()
    stack = [
        ref["shape"]
        for op in operations.values()
        for ref in [op.get("input"), op.get("output"), *op.get("errors", [])]
        if ref
    ]
    while stack:
        name = stack.pop()
        if name in wanted:
            continue
        wanted.add(name)
        shape = shapes[name]
        refs = list(shape.get("members", {}).values())
        refs += [shape[k] for k in ("member", "key", "value") if k in shape]
        stack += [r["shape"] for r in refs]
    return {
        **model,
        "operations": operations,
        "shapes": {k: v for k, v in shapes.items() if k in wanted},
    }


def trim_endpoints(data: Mapping[str, Any], service: str = "kms") -> dict[str, Any]:
    """botocore's endpoints.json with every partition kept but only ``service`` in each."""
    partitions = [
        {**p, "services": {k: v for k, v in p["services"].items() if k == service}}
        for p in data["partitions"]
    ]
    return {**data, "partitions": partitions}


def trimmed_botocore_data(dest: Path) -> Path:
    """A folder for AWS_DATA_PATH (searched before botocore's own data) holding endpoints.json
    and KMS's service model trimmed to what the product calls: item 3's "work done once at
    image-build time". A bench experiment, not what the product ships."""
    import gzip

    import botocore

    data = Path(botocore.__file__).parent / "data"
    dest.mkdir(parents=True, exist_ok=True)
    endpoints = json.loads((data / "endpoints.json").read_text())
    (dest / "endpoints.json").write_text(json.dumps(trim_endpoints(endpoints)))
    for version in (data / "kms").iterdir():
        source = version / "service-2.json.gz"
        text = (
            gzip.decompress(source.read_bytes())
            if source.exists()
            else ((version / "service-2.json").read_bytes())
        )
        model = trim_service_model(json.loads(text), PRODUCT_KMS_OPERATIONS)
        (dest / "kms" / version.name).mkdir(parents=True, exist_ok=True)
        (dest / "kms" / version.name / "service-2.json").write_text(json.dumps(model))
    return dest


def unlock_breakdown(
    plan: Plan,
    image: Path,
    product: Sequence[str],
    env: Mapping[str, str],
    trimmed_env: Mapping[str, str],
) -> dict[str, Any]:
    """Item 3: the interpreter, the imports and botocore's client, each as its own process."""
    py = sys.executable
    probes = {
        "python_start": [py, "-c", "pass"],
        "import_cli": [py, "-c", "import encryptrootfs.cli"],
        "import_verify_path": [
            py,
            "-c",
            "import encryptrootfs.cli, encryptrootfs.ops.enroll, encryptrootfs.providers.aws_kms,"
            " botocore.session, botocore.config",
        ],
        "botocore_client": [
            py,
            "-c",
            "import botocore.session\n"
            "s = botocore.session.get_session()\n"
            f"s.create_client('kms', region_name='{REGION}', endpoint_url='http://127.0.0.1:9',"
            " aws_access_key_id='AKIDEXAMPLE', aws_secret_access_key='x')",
        ],
        "header_read": ["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
    }
    probes["botocore_client_trimmed"] = probes["botocore_client"]
    out: dict[str, Any] = {}
    for name, argv in probes.items():
        penv = trimmed_env if name.endswith("_trimmed") else env
        got = [measure(argv, env=penv) for _ in range(max(3, plan.unlock_rounds))]
        out[name] = {
            "seconds": asdict(spread([g.seconds for g in got])),
            "max_rss_mib": asdict(spread([g.max_rss_mib for g in got])),
        }
    argv = list(product[1:]) if product[0] == py else list(product)
    trace = measure([py, "-X", "importtime", *argv], env=env)
    out["importtime"] = parse_importtime(trace.stderr)
    out["slowest_imports"] = slowest_imports(trace.stderr, 8)
    return out


# -- the piece ---------------------------------------------------------------------------------


def _summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Medians and spreads; the report reads only this and the raw runs."""
    summary: dict[str, Any] = {"data_pass": [], "unlock": {}}
    for item in data.get("data_pass", {}).get("sizes", []):
        prod = [r["mib_s"] for r in item["product"]]
        plain = [r["mib_s"] for r in item["plain"]]
        inplace = [r["mib_s"] for r in item.get("inplace", [])]
        # Each round's ratio pairs the round's own passes.
        ratios = [a / b for a, b in zip(prod, plain)]
        summary["data_pass"].append(
            {
                "size_mib": item["size_mib"],
                "product_mib_s": asdict(spread(prod)),
                "plain_mib_s": asdict(spread(plain)),
                "ratio": asdict(spread(ratios)),
                **(
                    {
                        "inplace_mib_s": asdict(spread(inplace)),
                        "inplace_user_s": asdict(spread([r["user_s"] for r in item["inplace"]])),
                        "inplace_sys_s": asdict(spread([r["sys_s"] for r in item["inplace"]])),
                        "inplace_rss_mib": asdict(
                            spread([r["max_rss_mib"] for r in item["inplace"]])
                        ),
                        "ratio_inplace": asdict(spread([a / b for a, b in zip(prod, inplace)])),
                    }
                    if inplace
                    else {}
                ),
                "product_user_s": asdict(spread([r["resume_user_s"] for r in item["product"]])),
                "product_sys_s": asdict(spread([r["resume_sys_s"] for r in item["product"]])),
                "plain_user_s": asdict(spread([r["user_s"] for r in item["plain"]])),
                "plain_sys_s": asdict(spread([r["sys_s"] for r in item["plain"]])),
                "product_rss_mib": asdict(
                    spread([r["cryptsetup_max_rss_mib"] for r in item["product"]])
                ),
                "product_whole_rss_mib": asdict(
                    spread([r["max_rss_mib"] for r in item["product"]])
                ),
                "plain_rss_mib": asdict(spread([r["max_rss_mib"] for r in item["plain"]])),
            }
        )
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in data.get("variants", {}).get("runs", []):
        by_name.setdefault(r["name"], []).append(r)
    summary["variants"] = [
        {
            "name": name,
            "ok": all(r["rc"] == 0 for r in rs),
            "err": next((r.get("err") for r in rs if r["rc"]), None),
            **(
                {
                    key: asdict(spread([r[key] for r in rs]))
                    for key in ("mib_s", "seconds", "user_s", "sys_s", "max_rss_mib")
                }
                if all(r["rc"] == 0 for r in rs)
                else {}
            ),
        }
        for name, rs in by_name.items()
    ]
    unlock = data.get("unlock")
    if unlock:
        runs = unlock["runs"]
        s: dict[str, Any] = {}
        for name, rs in runs.items():
            s[name] = {
                "seconds": asdict(spread([r["seconds"] for r in rs])),
                "max_rss_mib": asdict(spread([r["max_rss_mib"] for r in rs])),
                "cpu_s": asdict(spread([r["user_s"] + r["sys_s"] for r in rs])),
            }
        prod = [r["seconds"] for r in runs["product"]]
        s["ratio_to_clevis"] = asdict(
            spread([a / b for a, b in zip(prod, (r["seconds"] for r in runs["clevis_tang"]))])
        )
        s["ratio_to_argon2id"] = asdict(
            spread([a / b for a, b in zip(prod, (r["seconds"] for r in runs["argon2id"]))])
        )
        s["timeline"] = {
            k: statistics.median(t[k] for t in unlock["timelines"]) for k in unlock["timelines"][0]
        }
        if unlock.get("traced"):
            s["traced"] = {
                k: statistics.median(t[k] for t in unlock["traced"]) for k in unlock["traced"][0]
            }
        summary["unlock"] = s
    return summary


def run(plan: Plan) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("the native piece needs root (cryptsetup's locks, apt-get)")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=WORKDIR))
    try:
        data: dict[str, Any] = {"plan": asdict(plan), "cpu": _cpu_model()}
        data["unlock"] = run_unlock(plan, work)
        data["data_pass"] = run_data_pass(plan, work)
        data["variants"] = run_variants(plan, work)
        data["summary"] = _summarise(data)
        return data
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + (
                    " (AES-NI)" if " aes " in Path("/proc/cpuinfo").read_text() else ""
                )
    return "unknown"


if __name__ == "__main__":
    if sys.argv[1:2] == ["data-pass"]:
        sys.exit(data_pass_main(sys.argv[2:]))
    sys.exit("usage: python -m bench.native data-pass IMAGE [options] (key on stdin)")
