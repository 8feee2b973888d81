"""What the initramfs needs so that ``encryptrootfs boot`` runs there, and nothing more.

The dracut module ``50encryptrootfs`` asks this module (through the hidden command
``encryptrootfs dracut-files``) for the exact files to install. The answer is computed by the
interpreter that goes into the initramfs, so it matches that interpreter's stdlib, byte-code
tag and site folders:

1. A fresh interpreter (``python3 -I``, as in the initramfs) imports every module of this
   package and everything they import, even inside functions (found with :mod:`ast`), and
   walks the KMS code path of botocore without the network: a client with static credentials,
   a ``Decrypt`` answered by a ``before-send`` hook, an error answer, the credential chain.
   It reports the files of ``sys.modules``, the shared libraries in ``/proc/self/maps``, the
   botocore data files it loaded and the CA bundle botocore would verify against.
2. :func:`select_files` turns that report into the file list: stdlib modules that were
   imported, whole third-party packages (code only: a lazily imported error path must not be
   missing), botocore's data pruned to what a KMS call loads, and ``endpoints.json`` trimmed
   to KMS. Modules go in as byte code (sourceless ``x.pyc``, see :func:`sourceless`), so
   nothing compiles at boot under TCG; this package keeps its sources for tracebacks.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..config import DEFAULT_CONFIG_PATH, BootConfig, load_config
from ..errors import EncryptrootfsError, ToolError
from ..run import run
from ..tools import TOOLS, Need

KMS_SERVICE = "kms"
PACKAGE = "encryptrootfs"

# botocore data files (relative to botocore/data, without .json/.json.gz) that a KMS call with
# instance-role credentials loads: measured in shared/reference/kms-emulation.md. _retry is for
# the legacy retry mode (7 KB), kept so AWS_RETRY_MODE=legacy cannot break a boot. Files the
# trace sees loaded are added to these.
BOTOCORE_DATA = (
    "endpoints",
    "partitions",
    "sdk-default-configuration",
    "_retry",
    "kms/2014-11-01/service-2",
    "kms/2014-11-01/endpoint-rule-set-1",
)
ENDPOINTS_JSON = "endpoints.json"

# Modules imported lazily by the stdlib itself on paths the boot takes (str hosts go through the
# idna codec; time/datetime parsing loads _strptime) that a trace without the network misses.
EXTRA_STDLIB = (
    "encodings.idna",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "stringprep",
    "unicodedata",
    "_strptime",
)

# Programs the boot runs that tools.py does not list because dracut's systemd module already
# ships them; named here so a missing one fails the build, not the boot.
SYSTEM_PROGRAMS = ("udevadm", "systemctl", "dmsetup")


@dataclass(frozen=True)
class Trace:
    """What a fresh interpreter loaded while walking the boot path (see :data:`TRACE_PROGRAM`)."""

    executable: str
    cache_tag: str
    stdlib_dirs: tuple[str, ...]
    sys_path: tuple[str, ...]
    module_files: tuple[str, ...]
    libraries: tuple[str, ...] = ()
    botocore_data_loaded: tuple[str, ...] = ()
    ca_bundle: Optional[str] = None
    import_errors: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trace:
        return cls(
            executable=str(data["executable"]),
            cache_tag=str(data["cache_tag"]),
            stdlib_dirs=tuple(str(d) for d in data["stdlib_dirs"]),
            sys_path=tuple(str(d) for d in data["sys_path"]),
            module_files=tuple(str(f) for f in data["module_files"]),
            libraries=tuple(str(f) for f in data.get("libraries", ())),
            botocore_data_loaded=tuple(str(f) for f in data.get("botocore_data_loaded", ())),
            ca_bundle=data.get("ca_bundle"),
            import_errors=tuple(str(e) for e in data.get("import_errors", ())),
        )


@dataclass(frozen=True)
class InitramfsFiles:
    """The answer for the dracut module: what to install and how."""

    python: str  # the interpreter binary (real path); /usr/bin/python3 links to it
    python_links: tuple[str, ...]  # e.g. /usr/bin/python3
    files: tuple[str, ...]  # copied as they are (modules, byte code, data, CA bundle, config)
    libraries: tuple[str, ...]  # ELF objects the interpreter mapped (their deps are resolved)
    bytecode: tuple[tuple[str, str], ...]  # (__pycache__ file, where it goes: sourceless .pyc)
    endpoints_json: Optional[str]  # botocore's endpoints.json: installed trimmed to KMS
    programs: tuple[str, ...]  # required programs (names looked up in PATH)
    optional_programs: tuple[str, ...] = ()  # file-system tools: missing = fs unsupported
    config: Optional[str] = None
    # The initramfs's own kernel command-line defaults (/etc/cmdline.d): no shell on failure.
    cmdline_defaults: str = "rd.shell=0 rd.emergency=poweroff"
    # With [boot] require_encrypted: /sysroot is mounted from /dev/mapper/<this>, the mapping
    # encryptrootfs opened, never from whatever root=UUID= resolves to.
    sysroot_mapper: Optional[str] = None


# Where the failure defaults go in the initramfs; dracut reads /etc/cmdline.d/*.conf before
# /proc/cmdline, so an explicit rd.shell on the real command line still wins.
FAILURE_CMDLINE_PATH = "/etc/cmdline.d/49-encryptrootfs-failure.conf"


SYSROOT_DROPIN_PATH = "/etc/systemd/system/sysroot.mount.d/50-encryptrootfs.conf"


def sysroot_dropin(mapper_name: str) -> str:
    """sysroot.mount from the opened mapping: a second device carrying the root's UUID (an
    attached volume) can then never be what is mounted as /. Only with require_encrypted: a
    root left plain has no mapping to mount."""
    return f"[Mount]\nWhat=/dev/mapper/{mapper_name}\n"


def failure_cmdline(boot: BootConfig) -> str:
    """dracut arguments for a failed boot: by default no shell, and the machine powers off
    (``[boot] failure_action``); ``[boot] emergency_shell = true`` keeps dracut's shell."""
    if boot.emergency_shell:
        return "rd.shell=1"
    return f"rd.shell=0 rd.emergency={boot.failure_action}"


# --------------------------------------------------------------------------------------------
# endpoints.json


def trim_endpoints(data: Mapping[str, Any], service: str = KMS_SERVICE) -> dict[str, Any]:
    """``endpoints.json`` with every partition kept but only ``service`` in each.

    botocore loads the whole file for every client (1.2 MB); KMS needs its own entries of every
    partition (aws, aws-cn, aws-us-gov, iso ...) and the partition-wide defaults and regions,
    which FIPS and dual-stack variants are built from.
    """
    trimmed: dict[str, Any] = {k: v for k, v in data.items() if k != "partitions"}
    partitions = []
    for partition in data.get("partitions", []):
        kept = {k: v for k, v in partition.items() if k != "services"}
        services = partition.get("services", {})
        kept["services"] = {service: services[service]} if service in services else {}
        partitions.append(kept)
    trimmed["partitions"] = partitions
    return trimmed


def trimmed_endpoints_bytes(source: Path, service: str = KMS_SERVICE) -> bytes:
    """The trimmed file's content; ``source`` is only read."""
    try:
        data = json.loads(source.read_bytes())
    except (OSError, ValueError) as e:
        raise EncryptrootfsError(
            f"{source} cannot be read as botocore's endpoint data: {e}; the initramfs was not "
            "built.",
            hint="reinstall botocore",
        ) from None
    return json.dumps(trim_endpoints(data, service), separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------------------------
# which modules the package imports


def package_dir() -> Path:
    """The ``encryptrootfs`` package folder (this module sits in its ``image/``)."""
    return Path(__file__).resolve().parents[1]


def package_modules(root: Path, name: str = PACKAGE) -> list[str]:
    """Dotted names of every module in the package at ``root`` (not ``__main__``, no data)."""
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        # Folders without __init__.py are data (dracut/), not packages.
        if any(
            not (root.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))
        ):
            continue
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join([name, *parts]))
    return names


def imported_names(root: Path, name: str = PACKAGE) -> tuple[list[str], list[str]]:
    """Module names the package's code imports anywhere (functions included).

    Returns (modules, candidates): ``import a.b`` and ``from a.b import c`` give the module
    ``a.b``; ``c`` may be a submodule or any other name, so ``a.b.c`` is only a candidate.
    """
    found: set[str] = set()
    candidates: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                # ``from botocore import exceptions``: the name may be a submodule.
                candidates.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")

    def ours(n: str) -> bool:
        return n.split(".")[0] in (name, "__future__")

    return (
        sorted(n for n in found if not ours(n)),
        sorted(n for n in candidates - found if not ours(n)),
    )


# --------------------------------------------------------------------------------------------
# the trace, run by the target interpreter

# Runs as ``python3 -I -c TRACE_PROGRAM MODULE...``: MODULEs are imported; failures of the ones
# prefixed "?" are only reported (``import tomli`` under a version check), those prefixed "~"
# are ignored (``from typing import Any`` yields the candidate ``typing.Any``).
TRACE_PROGRAM = r"""
import importlib, importlib.util, json, os, sys, sysconfig

# Never a network, and nothing of the image builder's own AWS settings (a profile or an
# endpoint URL of the machine that builds the image must not change what is traced).
for key in [k for k in os.environ if k.startswith("AWS_")]:
    del os.environ[key]
os.environ.update({
    "AWS_ACCESS_KEY_ID": "AKIDTRACE", "AWS_SECRET_ACCESS_KEY": "trace",
    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
})

errors = []
for arg in sys.argv[1:]:
    name = arg.lstrip("?~")
    try:
        importlib.import_module(name)
    except Exception as e:
        if arg == name:
            raise
        if arg.startswith("?"):
            errors.append("%s: %s" % (name, e))

"x.example".encode("idna")
import time, datetime
time.strptime("2026-01-01", "%Y-%m-%d")

loaded = []
ca_bundle = None
try:
    import botocore.loaders
except ImportError:
    botocore = None
if botocore is not None:
    real_load = botocore.loaders.JSONFileLoader.load_file
    def load_file(self, file_path, *args, **kwargs):
        result = real_load(self, file_path, *args, **kwargs)
        if result is not None:
            for ext in (".json", ".json.gz"):
                if os.path.exists(file_path + ext):
                    loaded.append(os.path.realpath(file_path + ext))
        return result
    botocore.loaders.JSONFileLoader.load_file = load_file

    import botocore.session, botocore.credentials, botocore.httpsession, botocore.utils
    from botocore.awsrequest import AWSResponse
    from botocore.config import Config
    from botocore.exceptions import ClientError

    class Body:
        def __init__(self, data):
            self.data = data
        def stream(self, **kwargs):
            yield self.data

    answers = [
        (200, {"KeyId": "arn:aws:kms:us-east-1:111122223333:key/trace",
               "Plaintext": "AAAA", "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}),
        (400, {"__type": "AccessDeniedException", "message": "trace"}),
    ]
    def before_send(request, **kwargs):
        status, body = answers.pop(0) if answers else (500, {})
        return AWSResponse(request.url, status,
                           {"content-type": "application/x-amz-json-1.1",
                            "x-amzn-requestid": "trace"},
                           Body(json.dumps(body).encode()))

    session = botocore.session.Session()
    session.set_config_variable("metadata_service_num_attempts", 1)
    session.get_credentials()
    for region in ("us-east-1", "us-gov-west-1", "cn-north-1"):
        client = session.create_client(
            "kms", region_name=region,
            aws_access_key_id="AKIDTRACE", aws_secret_access_key="trace",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                          connect_timeout=1, read_timeout=1, user_agent_extra="trace"))
        client.meta.events.register("before-send.kms", before_send)
        if region == "us-east-1":
            client.decrypt(CiphertextBlob=b"trace", EncryptionContext={"a": "b"})
            try:
                client.decrypt(CiphertextBlob=b"trace")
            except ClientError:
                pass
    botocore.utils.parse_timestamp("2026-11-28T05:00:00Z")
    try:
        ca_bundle = botocore.httpsession.get_cert_path(True)
    except Exception:
        ca_bundle = None
    if ca_bundle:
        ca_bundle = os.path.realpath(ca_bundle)

files = set()
for module in list(sys.modules.values()):
    f = getattr(module, "__file__", None)
    if not f:
        continue
    files.add(f)
    if f.endswith(".py"):
        try:
            files.add(importlib.util.cache_from_source(f))
        except Exception:
            pass
files.add(os.path.join(os.path.dirname(os.__file__), "os.py"))

libraries = set()
try:
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and ".so" in os.path.basename(parts[5].strip()):
                libraries.add(parts[5].strip())
except OSError:
    pass

paths = sysconfig.get_paths()
json.dump({
    "executable": os.path.realpath(sys.executable),
    "cache_tag": sys.implementation.cache_tag,
    # Not platstdlib: in a virtualenv that is the venv's own lib folder.
    "stdlib_dirs": sorted({paths["stdlib"], os.path.dirname(os.__file__),
                           sysconfig.get_config_var("DESTSHARED") or paths["stdlib"]}),
    "sys_path": [p for p in sys.path if p],
    "module_files": sorted(f for f in files if os.path.exists(f)),
    "libraries": sorted(libraries),
    "botocore_data_loaded": sorted(set(loaded)),
    "ca_bundle": ca_bundle,
    "import_errors": errors,
}, sys.stdout)
"""


def trace_modules(package_root: Path) -> list[str]:
    """The arguments of the trace: our modules (must import), what they import (may fail)."""
    ours = package_modules(package_root)
    modules, candidates = imported_names(package_root)
    return [
        *ours,
        *(f"?{n}" for n in modules),
        *(f"~{n}" for n in candidates),
        *(f"?{n}" for n in EXTRA_STDLIB),
    ]


def run_trace(python: str, package_root: Path) -> Trace:
    """Run the trace in a fresh ``python -I`` (the way the initramfs starts it)."""
    result = run(
        [python, "-I", "-c", TRACE_PROGRAM, *trace_modules(package_root)],
        timeout=300,
        hint="the initramfs would lack a module; fix the import error and run dracut again",
    )
    try:
        return Trace.from_json(json.loads(result.stdout))
    except (ValueError, KeyError) as e:
        raise EncryptrootfsError(
            f"The module trace of {python} printed no usable report ({e}); the initramfs was "
            "not built."
        ) from None


# --------------------------------------------------------------------------------------------
# selection


def _under(path: str, folders: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in folders)


def _top_package(path: str, site_dirs: Iterable[str]) -> Optional[tuple[str, str]]:
    """(site dir, first path component) of a module file outside the stdlib."""
    for d in sorted(site_dirs, key=len, reverse=True):
        if _under(path, [d]):
            rel = os.path.relpath(path, d)
            return d, rel.split(os.sep)[0]
    return None


def _package_code(top: Path, cache_tag: str) -> list[str]:
    """Every .py of a package and the byte code of the running interpreter for it."""
    out = []
    for path in sorted(top.rglob("*.py")):
        out.append(str(path))
        pyc = path.parent / "__pycache__" / f"{path.stem}.{cache_tag}.pyc"
        if pyc.exists():
            out.append(str(pyc))
    return out


def _botocore_data(data_dir: Path, loaded: Iterable[str]) -> tuple[list[str], Optional[str]]:
    """The data files to keep (the allow list and what the trace loaded) and endpoints.json."""
    keep: set[str] = {os.path.realpath(p) for p in loaded if _under(p, [str(data_dir)])}
    for stem in BOTOCORE_DATA:
        for ext in (".json", ".json.gz"):
            candidate = data_dir / f"{stem}{ext}"
            if candidate.exists():
                keep.add(str(candidate))
    endpoints = data_dir / ENDPOINTS_JSON
    endpoints_path = str(endpoints) if endpoints.exists() else None
    keep.discard(str(endpoints))
    return sorted(keep), endpoints_path


def sourceless(
    files: Iterable[str], cache_tag: str, keep_sources_under: Sequence[str] = ()
) -> tuple[set[str], list[tuple[str, str]]]:
    """Replace ``x.py`` + ``__pycache__/x.TAG.pyc`` by a sourceless ``x.pyc`` next to where
    ``x.py`` was.

    Byte code in ``__pycache__`` is only used while its source is there, and checked against
    the source's mtime (which ``dracut --reproducible`` rewrites). A sourceless ``x.pyc`` is
    loaded as it is: no source, no check, about half the bytes. ``os.py`` stays: it is the
    landmark by which Python finds its stdlib. Sources under ``keep_sources_under`` stay
    (our own package, for readable tracebacks with ``--debug``).
    """
    kept = set(files)
    moved: list[tuple[str, str]] = []
    for source in sorted(kept):
        if not source.endswith(".py") or _under(source, keep_sources_under):
            continue
        folder, name = os.path.split(source)
        if name == "os.py":
            continue
        pyc = os.path.join(folder, "__pycache__", f"{name[:-3]}.{cache_tag}.pyc")
        if pyc in kept or os.path.exists(pyc):
            kept.discard(source)
            kept.discard(pyc)
            moved.append((pyc, source + "c"))
    return kept, moved


def select_files(
    trace: Trace,
    *,
    config_path: Optional[Path] = DEFAULT_CONFIG_PATH,
    python_links: Sequence[str] = ("/usr/bin/python3",),
    exclude_dirs: Sequence[str] = (),
) -> InitramfsFiles:
    """Turn a :class:`Trace` into the install list (pure: reads the file system only)."""
    files: set[str] = set()
    packages: dict[str, Path] = {}
    site_dirs = [d for d in trace.sys_path if not _under(d, trace.stdlib_dirs)]
    for f in trace.module_files:
        if _under(f, trace.stdlib_dirs):
            files.add(f)
            continue
        found = _top_package(f, site_dirs)
        if found is None:
            files.add(f)
            continue
        site, top = found
        if top.endswith((".py", ".pyc")) or top == "__pycache__":
            files.add(f)  # a single-file module such as six.py and its byte code
        else:
            packages[top] = Path(site) / top

    endpoints: Optional[str] = None
    for name, folder in sorted(packages.items()):
        code = _package_code(folder, trace.cache_tag)
        if name == PACKAGE:
            # The dracut module is package data for `install`, not something the boot runs.
            code = [c for c in code if not _under(c, [str(folder / "dracut")])]
        files.update(code)
        if name == "botocore":
            data, endpoints = _botocore_data(folder / "data", trace.botocore_data_loaded)
            files.update(data)
    if trace.ca_bundle:
        files.add(trace.ca_bundle)
    config = str(config_path) if config_path is not None and config_path.exists() else None
    if config:
        files.add(config)
    libraries = sorted(lib for lib in trace.libraries if lib != trace.executable)
    files.discard(trace.executable)
    if exclude_dirs:
        files = {f for f in files if not _under(f, exclude_dirs)}
    ours = [str(folder) for name, folder in packages.items() if name == PACKAGE]
    files, bytecode = sourceless(files, trace.cache_tag, ours)
    required = [t.name for t in TOOLS if t.need in (Need.LUKS, Need.PARTITION)]
    optional = [t.name for t in TOOLS if t.need not in (Need.LUKS, Need.PARTITION)]
    return InitramfsFiles(
        python=trace.executable,
        python_links=tuple(python_links),
        files=tuple(sorted(files)),
        libraries=tuple(libraries),
        bytecode=tuple(bytecode),
        endpoints_json=endpoints,
        programs=tuple([*required, *SYSTEM_PROGRAMS]),
        optional_programs=tuple(optional),
        config=config,
    )


def plan_initramfs(python: Optional[str] = None) -> InitramfsFiles:
    """What goes into the initramfs for the interpreter ``python`` (default: this one)."""
    python = python or sys.executable
    if not python:
        raise ToolError("No Python interpreter is known to trace; the initramfs was not built.")
    trace = run_trace(python, package_dir())
    config = load_config(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else None
    boot = config.boot if config is not None else BootConfig()
    mapper = config.mapper_name if config is not None and boot.require_encrypted else None
    return replace(
        select_files(trace), cmdline_defaults=failure_cmdline(boot), sysroot_mapper=mapper
    )


# --------------------------------------------------------------------------------------------
# the manifest the dracut module reads


def manifest_lines(plan: InitramfsFiles, stage: Path) -> list[str]:
    """Tab-separated lines for module-setup.sh; writes generated files below ``stage``.

    ``binary PATH``, ``link TARGET LINK``, ``file PATH``, ``library PATH``, ``staged SRC DST``,
    ``bytecode PYC DST``, ``program NAME``, ``program? NAME`` (optional), ``config PATH``.
    """
    lines = [f"binary\t{plan.python}"]
    lines += [f"link\t{plan.python}\t{link}" for link in plan.python_links]
    if plan.endpoints_json:
        target = stage / plan.endpoints_json.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(trimmed_endpoints_bytes(Path(plan.endpoints_json)))
        lines.append(f"staged\t{target}\t{plan.endpoints_json}")
    if plan.cmdline_defaults:
        target = stage / FAILURE_CMDLINE_PATH.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(plan.cmdline_defaults + "\n")
        lines.append(f"staged\t{target}\t{FAILURE_CMDLINE_PATH}")
    if plan.sysroot_mapper:
        target = stage / SYSROOT_DROPIN_PATH.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(sysroot_dropin(plan.sysroot_mapper))
        lines.append(f"staged\t{target}\t{SYSROOT_DROPIN_PATH}")
    lines += [f"file\t{f}" for f in plan.files if f != plan.config]
    lines += [f"bytecode\t{pyc}\t{dst}" for pyc, dst in plan.bytecode]
    if plan.config:
        lines.append(f"config\t{plan.config}")
    lines += [f"library\t{lib}" for lib in plan.libraries]
    lines += [f"program\t{p}" for p in plan.programs]
    lines += [f"program?\t{p}" for p in plan.optional_programs]
    return lines
