"""What the dracut module puts into the initramfs: pure selection logic, no subprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import botocore
import pytest
from botocore.regions import EndpointResolver

from encryptrootfs.boot import network
from encryptrootfs.image import initramfs
from encryptrootfs.image.initramfs import (
    Trace,
    imported_names,
    manifest_lines,
    package_modules,
    select_files,
    trim_endpoints,
    trimmed_endpoints_bytes,
)

REAL_ENDPOINTS = Path(botocore.__file__).parent / "data" / "endpoints.json"


def _partition(name: str, services: dict[str, Any]) -> dict[str, Any]:
    return {
        "partition": name,
        "dnsSuffix": f"{name}.example",
        "regionRegex": "^x$",
        "regions": {f"{name}-1": {"description": name}},
        "defaults": {"hostname": "{service}.{region}.{dnsSuffix}", "variants": []},
        "services": services,
    }


def test_trim_keeps_kms_of_every_partition_and_drops_other_services() -> None:
    kms_fips = {
        "endpoints": {"fips-us-gov-west-1": {"deprecated": True}},
        "defaults": {"variants": [{"hostname": "kms-fips.{region}", "tags": ["fips"]}]},
    }
    data: dict[str, Any] = {
        "version": 3,
        "partitions": [
            _partition("aws", {"kms": {"endpoints": {"us-east-1": {}}}, "s3": {}, "ec2": {}}),
            _partition("aws-cn", {"kms": {"endpoints": {"cn-north-1": {}}}, "s3": {}}),
            _partition("aws-us-gov", {"kms": kms_fips, "sts": {}}),
            _partition("aws-iso-x", {"s3": {}}),
        ],
    }
    trimmed = trim_endpoints(data)
    assert trimmed["version"] == 3
    assert [p["partition"] for p in trimmed["partitions"]] == [
        "aws",
        "aws-cn",
        "aws-us-gov",
        "aws-iso-x",
    ]
    by_name = {p["partition"]: p for p in trimmed["partitions"]}
    assert by_name["aws"]["services"] == {"kms": {"endpoints": {"us-east-1": {}}}}
    assert by_name["aws-cn"]["services"] == {"kms": {"endpoints": {"cn-north-1": {}}}}
    assert by_name["aws-us-gov"]["services"] == {"kms": kms_fips}
    assert by_name["aws-iso-x"]["services"] == {}
    # Partition-wide data (regions, defaults, dnsSuffix) builds FIPS/dual-stack names: kept.
    for name, partition in by_name.items():
        original = next(p for p in data["partitions"] if p["partition"] == name)
        assert {k: v for k, v in partition.items() if k != "services"} == {
            k: v for k, v in original.items() if k != "services"
        }
    # The input is not modified.
    assert "s3" in data["partitions"][0]["services"]


def test_real_endpoints_trimmed_still_resolve_kms_in_commercial_china_and_govcloud() -> None:
    original = json.loads(REAL_ENDPOINTS.read_bytes())
    trimmed = trim_endpoints(original)
    assert len(trimmed["partitions"]) == len(original["partitions"])
    for partition in trimmed["partitions"]:
        assert set(partition["services"]) <= {"kms"}
        had_kms = any(
            p["partition"] == partition["partition"] and "kms" in p["services"]
            for p in original["partitions"]
        )
        assert ("kms" in partition["services"]) == had_kms
    assert len(json.dumps(trimmed)) < len(json.dumps(original)) / 10

    full, small = EndpointResolver(original), EndpointResolver(trimmed)
    cases = [
        ("us-east-1", False),
        ("eu-west-1", False),
        ("cn-north-1", False),
        ("us-gov-west-1", False),
        ("us-gov-west-1", True),
        ("us-east-1", True),
    ]
    for region, fips in cases:
        expected = full.construct_endpoint("kms", region, use_fips_endpoint=fips)
        got = small.construct_endpoint("kms", region, use_fips_endpoint=fips)
        assert got is not None and expected is not None
        assert got["hostname"] == expected["hostname"], (region, fips)
    assert (
        "fips"
        in small.construct_endpoint("kms", "us-gov-west-1", use_fips_endpoint=True)["hostname"]
    )
    assert small.construct_endpoint("kms", "cn-north-1")["hostname"].endswith(".com.cn")


def test_trimmed_endpoints_bytes_reads_but_never_writes_the_source(tmp_path: Path) -> None:
    source = tmp_path / "endpoints.json"
    raw = json.dumps(
        {"version": 3, "partitions": [_partition("aws", {"kms": {}, "s3": {}})]}
    ).encode()
    source.write_bytes(raw)
    out = json.loads(trimmed_endpoints_bytes(source))
    assert out["partitions"][0]["services"] == {"kms": {}}
    assert source.read_bytes() == raw


def test_package_modules_lists_code_not_data_folders_nor_main(tmp_path: Path) -> None:
    pkg = tmp_path / "encryptrootfs"
    for rel in (
        "__init__.py",
        "__main__.py",
        "cli.py",
        "boot/__init__.py",
        "boot/unlock.py",
        "dracut/50encryptrootfs/helper.py",
    ):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    assert package_modules(pkg) == [
        "encryptrootfs",
        "encryptrootfs.boot",
        "encryptrootfs.boot.unlock",
        "encryptrootfs.cli",
    ]


def test_the_real_package_modules_include_the_boot_path() -> None:
    names = package_modules(initramfs.package_dir())
    assert {
        "encryptrootfs.cli",
        "encryptrootfs.boot",
        "encryptrootfs.providers.aws_kms",
        "encryptrootfs.image.initramfs",
    } <= set(names)
    assert not any(".dracut" in n or n.endswith("__main__") for n in names)


def test_imported_names_sees_imports_inside_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "encryptrootfs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from __future__ import annotations\nimport json\n")
    (pkg / "lazy.py").write_text(
        "from . import sibling\n"
        "from encryptrootfs.x import y\n"
        "def f():\n"
        "    import botocore.session\n"
        "    from botocore import exceptions as bx\n"
        "    from urllib.parse import urlsplit\n"
    )
    modules, candidates = imported_names(pkg)
    assert modules == ["botocore", "botocore.session", "json", "urllib.parse"]
    assert candidates == ["botocore.exceptions", "urllib.parse.urlsplit"]


def _touch(path: Path, data: bytes = b"") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Any]:
    """A fake interpreter layout: stdlib, a site folder with our package and botocore."""
    stdlib = tmp_path / "usr/lib/python3.11"
    site = tmp_path / "usr/local/lib/python3.11/dist-packages"
    f: dict[str, str] = {}
    f["os"] = _touch(stdlib / "os.py")
    f["os_pyc"] = _touch(stdlib / "__pycache__/os.cpython-311.pyc")
    f["json"] = _touch(stdlib / "json/__init__.py")
    f["json_pyc"] = _touch(stdlib / "json/__pycache__/__init__.cpython-311.pyc")
    f["ssl_so"] = _touch(stdlib / "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so")
    f["unused_stdlib"] = _touch(stdlib / "tkinter/__init__.py")
    f["ours"] = _touch(site / "encryptrootfs/__init__.py")
    f["ours_pyc"] = _touch(site / "encryptrootfs/__pycache__/__init__.cpython-311.pyc")
    f["ours_old_pyc"] = _touch(site / "encryptrootfs/__pycache__/__init__.cpython-39.pyc")
    f["ours_lazy"] = _touch(site / "encryptrootfs/boot/first_boot.py")
    f["module_setup"] = _touch(site / "encryptrootfs/dracut/50encryptrootfs/module-setup.sh")
    f["module_py"] = _touch(site / "encryptrootfs/dracut/50encryptrootfs/x.py")
    f["boto"] = _touch(site / "botocore/__init__.py")
    f["boto_lazy"] = _touch(site / "botocore/retries/throttling.py")
    f["boto_lazy_pyc"] = _touch(site / "botocore/retries/__pycache__/throttling.cpython-311.pyc")
    f["cacert"] = _touch(site / "botocore/cacert.pem")
    data = site / "botocore/data"
    f["endpoints"] = _touch(data / "endpoints.json", b'{"partitions": []}')
    f["partitions"] = _touch(data / "partitions.json")
    f["sdk"] = _touch(data / "sdk-default-configuration.json")
    f["kms_service"] = _touch(data / "kms/2014-11-01/service-2.json.gz")
    f["kms_rules"] = _touch(data / "kms/2014-11-01/endpoint-rule-set-1.json.gz")
    f["kms_examples"] = _touch(data / "kms/2014-11-01/examples-1.json")
    f["s3_service"] = _touch(data / "s3/2006-03-01/service-2.json.gz")
    f["sts_loaded"] = _touch(data / "sts/2011-06-15/service-2.json.gz")
    f["six"] = _touch(site / "six.py")
    f["six_pyc"] = _touch(site / "__pycache__/six.cpython-311.pyc")
    f["config"] = _touch(tmp_path / "etc/encryptrootfs/config.toml")
    trace = Trace(
        executable=_touch(tmp_path / "usr/bin/python3.11"),
        cache_tag="cpython-311",
        stdlib_dirs=(str(stdlib), str(stdlib / "lib-dynload")),
        sys_path=(str(stdlib), str(stdlib / "lib-dynload"), str(site)),
        module_files=(
            f["os"],
            f["os_pyc"],
            f["json"],
            f["json_pyc"],
            f["ssl_so"],
            f["ours"],
            f["ours_pyc"],
            f["boto"],
            f["six"],
            f["six_pyc"],
        ),
        libraries=(f["ssl_so"], "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
        botocore_data_loaded=(f["sts_loaded"],),
        ca_bundle=f["cacert"],
    )
    return {"trace": trace, "files": f, "root": tmp_path}


def test_select_files_takes_imported_stdlib_and_whole_packages_with_pruned_data(
    layout: dict[str, Any],
) -> None:
    f = layout["files"]
    plan = select_files(layout["trace"], config_path=Path(f["config"]))
    chosen = set(plan.files)
    # Our package keeps its sources (tracebacks); os.py is the stdlib landmark.
    wanted = [
        "os",
        "os_pyc",
        "ssl_so",
        "ours",
        "ours_pyc",
        "ours_lazy",
        "cacert",
        "partitions",
        "sdk",
        "kms_service",
        "kms_rules",
        "sts_loaded",
        "config",
    ]
    for name in wanted:
        assert f[name] in chosen, name
    # Everything else goes in as sourceless byte code where the source was.
    bytecode = dict(plan.bytecode)
    for source, pyc in [("json", "json_pyc"), ("boto_lazy", "boto_lazy_pyc"), ("six", "six_pyc")]:
        assert bytecode[f[pyc]] == f[source] + "c"
        assert f[source] not in chosen and f[pyc] not in chosen
    # No byte code on disk: the source goes in (compiled in memory at boot).
    assert f["boto"] in chosen
    # Not imported, another interpreter's byte code, the dracut module (package data), data
    # of other services, and endpoints.json (installed trimmed instead).
    for name in [
        "unused_stdlib",
        "ours_old_pyc",
        "module_setup",
        "module_py",
        "kms_examples",
        "s3_service",
        "endpoints",
    ]:
        assert f[name] not in chosen, name
    assert plan.endpoints_json == f["endpoints"]
    assert plan.config == f["config"]
    assert plan.python == layout["trace"].executable
    assert plan.python not in chosen
    assert "/usr/lib/x86_64-linux-gnu/libssl.so.3" in plan.libraries
    assert plan.programs[0] == "cryptsetup"
    assert {"blkid", "sfdisk", "partx", "udevadm"} <= set(plan.programs)
    assert {"resize2fs", "xfs_growfs", "btrfs"} <= set(plan.optional_programs)
    assert not set(plan.programs) & set(plan.optional_programs)


def test_select_files_without_a_config_file(layout: dict[str, Any]) -> None:
    plan = select_files(layout["trace"], config_path=layout["root"] / "nope.toml")
    assert plan.config is None


def test_manifest_stages_the_trimmed_endpoints_and_lists_every_file(
    layout: dict[str, Any],
    tmp_path: Path,
) -> None:
    f = layout["files"]
    endpoints = Path(f["endpoints"])
    endpoints.write_text(
        json.dumps(
            {"version": 3, "partitions": [_partition("aws", {"kms": {"endpoints": {}}, "s3": {}})]}
        )
    )
    before = endpoints.read_bytes()
    plan = select_files(layout["trace"], config_path=Path(f["config"]))
    stage = tmp_path / "stage"
    lines = manifest_lines(plan, stage)
    rows = [line.split("\t") for line in lines]
    assert all(len(r) in (2, 3) and r[0] for r in rows)
    staged = [r for r in rows if r[0] == "staged" and r[2] == str(endpoints)]
    assert staged == [["staged", str(stage / str(endpoints).lstrip("/")), str(endpoints)]]
    written = json.loads(Path(staged[0][1]).read_bytes())
    assert written["partitions"][0]["services"] == {"kms": {"endpoints": {}}}
    assert endpoints.read_bytes() == before  # the system's file is untouched
    assert ["binary", plan.python] in rows
    assert ["link", plan.python, "/usr/bin/python3"] in rows
    assert ["config", f["config"]] in rows
    assert {r[1] for r in rows if r[0] == "file"} == set(plan.files) - {f["config"]}
    assert {(r[1], r[2]) for r in rows if r[0] == "bytecode"} == set(plan.bytecode)
    assert plan.bytecode
    assert ["program", "cryptsetup"] in rows
    assert ["program?", "btrfs"] in rows


def test_resolv_conf_is_written_from_networkd_leases_only_when_missing(tmp_path: Path) -> None:
    leases = tmp_path / "leases"
    leases.mkdir()
    (leases / "2").write_text(
        "# This is private data.\nADDRESS=169.254.169.15\nDNS=169.254.169.3 10.0.0.2\n"
    )
    (leases / "10").write_text("DNS=10.0.0.2 192.0.2.53\n")
    resolv = tmp_path / "etc/resolv.conf"
    resolv.parent.mkdir()
    resolv.symlink_to(tmp_path / "run/systemd/resolve/stub-resolv.conf")  # dangling
    assert network.ensure_resolv_conf(resolv, leases) == [
        "169.254.169.3",
        "10.0.0.2",
        "192.0.2.53",
    ]
    assert not resolv.is_symlink()
    assert [line for line in resolv.read_text().splitlines() if not line.startswith("#")] == [
        "nameserver 169.254.169.3",
        "nameserver 10.0.0.2",
        "nameserver 192.0.2.53",
    ]
    # A resolv.conf that already names a server (dhclient wrote it) is left alone.
    resolv.write_text("nameserver 192.0.2.1\n")
    assert network.ensure_resolv_conf(resolv, leases) == []
    assert resolv.read_text() == "nameserver 192.0.2.1\n"


def test_no_lease_no_resolv_conf(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    assert network.ensure_resolv_conf(resolv, tmp_path / "missing") == []
    assert not resolv.exists()


MODULE_SETUP = initramfs.package_dir() / "dracut" / "50encryptrootfs" / "module-setup.sh"


def test_module_setup_handles_every_kind_of_manifest_line(
    layout: dict[str, Any], tmp_path: Path
) -> None:
    plan = select_files(layout["trace"], config_path=Path(layout["files"]["config"]))
    kinds = {line.split("\t")[0] for line in manifest_lines(plan, tmp_path / "stage")}
    assert kinds == {
        "binary",
        "link",
        "staged",
        "file",
        "bytecode",
        "config",
        "library",
        "program",
        "program?",
    }
    script = MODULE_SETUP.read_text()
    case = script[script.index("case $_kind in") : script.index("esac")]
    labels: set[str] = set()
    for line in case.splitlines()[1:]:
        head = line.strip().split(")")[0]
        if head and not head.startswith("#"):
            labels.update(p.strip().replace("\\?", "?") for p in head.split("|"))
    assert kinds <= labels
    # The unit the module installs is the file shipped next to it.
    for name in (
        "encryptrootfs.service",
        "90-encryptrootfs.network",
        "encryptrootfs-network-legacy.conf",
    ):
        assert f'"$moddir/{name}"' in script
        assert (MODULE_SETUP.parent / name).is_file()


def test_the_unit_runs_the_boot_before_root_fsck_and_mount_and_fails_closed() -> None:
    unit = (MODULE_SETUP.parent / "encryptrootfs.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).extend(value.split())
    assert settings["ExecStart"][:2] == ["/usr/bin/python3", "-I"]
    assert settings["ExecStart"][-3:] == ["-m", "encryptrootfs", "boot"]
    assert {"systemd-fsck-root.service", "sysroot.mount", "initrd-root-device.target"} <= set(
        settings["Before"]
    )
    assert set(settings["RequiredBy"]) == {"sysroot.mount", "systemd-fsck-root.service"}
    assert settings["DefaultDependencies"] == ["no"]
    assert settings["Type"] == ["oneshot"] and settings["RemainAfterExit"] == ["yes"]
    assert settings["TimeoutStartSec"] == ["infinity"]
    assert "journal+console" in settings["StandardOutput"]
    assert "systemd-udev-trigger.service" in settings["After"]
    assert "systemd-udev-settle.service" not in settings["After"] + settings.get("Wants", [])
