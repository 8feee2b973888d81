"""encryptrootfs-lab: build lab images and disks, boot one guest, run the demo.

encryptrootfs-lab build [layout options]      image + disk (cached), prints build times
encryptrootfs-lab boot  [layout options] ...   one boot with the emulators up; prints the
                                               results, the console tail and timings
encryptrootfs-lab demo                         what `make demo` runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from encryptrootfs.errors import EncryptrootfsError, ExitCode
from encryptrootfs.log import setup_logging

from .cache import cache_root
from .cloud import GUEST_KMS_URL, emulated_cloud
from .image import PLAIN, PROBE, Image, ImageSpec, build_image
from .layout import (
    Content,
    Disk,
    DiskLayout,
    Filesystem,
    PartitionTable,
    build_disk,
    verify_root_script,
)
from .qemu import BootEnd, BootResult, BootSpec, boot, create_overlay

IMAGES = {"plain": PLAIN, "probe": PROBE}


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image and disk layout")
    g.add_argument(
        "--image",
        choices=sorted(IMAGES),
        default="plain",
        help="plain: the product installed, nothing more; probe: plus the lab's "
        "initramfs probe module (rd.erfslab.probe=1)",
    )
    g.add_argument("--fs", choices=[f.value for f in Filesystem], default="ext4")
    g.add_argument("--table", choices=[t.value for t in PartitionTable], default="gpt")
    g.add_argument("--root-mib", type=int, default=0, help="root partition size (0: automatic)")
    g.add_argument(
        "--free-mib", type=int, default=64, help="unpartitioned space after the root partition"
    )
    g.add_argument("--separate-boot", action="store_true", help="put /boot on its own partition")
    g.add_argument(
        "--sector",
        type=int,
        choices=(512, 4096),
        default=512,
        help="logical sector size of the disk",
    )


def _layout(args: argparse.Namespace) -> DiskLayout:
    return DiskLayout(
        fs=Filesystem(args.fs),
        table=PartitionTable(args.table),
        root_mib=args.root_mib,
        free_after_mib=args.free_mib,
        separate_boot=args.separate_boot,
        sector=args.sector,
        content=Content.ROOTFS,
    )


def _build(spec: ImageSpec, layout: DiskLayout) -> tuple[Image, Disk]:
    image = build_image(spec)
    if image.cached:
        print(f"image {spec.name}: cached ({image.key})")
    else:
        print(f"image {spec.name}: built in {image.build_seconds:.1f}s ({image.key})")
    disk = build_disk(layout, image)
    how = "cached" if disk.cached else f"built in {disk.build_seconds:.1f}s"
    print(f"disk {layout.name}: {how} ({disk.path})")
    return image, disk


def cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    image, disk = _build(IMAGES[args.image], _layout(args))
    print(f"kernel  {image.kernel}\ninitrd  {image.initrd} ({image.initrd.stat().st_size} bytes)")
    print(f"root    UUID={disk.root_uuid} (partition {disk.root_partition})")
    print(f"cache   {cache_root()}")
    print(f"total   {time.monotonic() - started:.1f}s")
    return 0


def _print_result(result: BootResult, tail: int) -> None:
    print(f"--- results ({result.results_path}) ---")
    print(result.results.rstrip())
    print(f"--- console tail ({result.console_path}) ---")
    print(result.console_tail(tail))
    print("---")
    up = result.guest_uptime_at_boot
    print(
        f"boot: {result.end.value} after {result.wall_seconds:.1f}s wall"
        + (f", multi-user at {up:.1f}s guest uptime" if up is not None else "")
        + (f", script exit code {result.script_rc}" if result.script_rc is not None else "")
        + (f" ({result.kill_reason})" if result.kill_reason else "")
    )


def cmd_boot(args: argparse.Namespace) -> int:
    image, disk = _build(IMAGES[args.image], _layout(args))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="erfslab-boot-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.overlay:
        overlay = Path(args.overlay)
        if not overlay.exists():
            create_overlay(disk.path, overlay)
        drive = disk.drive(overlay)
    else:
        drive = disk.drive(snapshot=True)
    script: Optional[str] = None
    if args.script:
        script = Path(args.script).read_text()
    elif not args.no_verify:
        script = verify_root_script()
    append = tuple(args.append or ())
    if args.image == "probe":
        append += ("rd.neednet=1", "ip=dhcp", "rd.erfslab.probe=1")
    with emulated_cloud() as cloud:
        spec = BootSpec(
            kernel=image.kernel,
            initrd=image.initrd,
            root_uuid=disk.root_uuid,
            drives=(drive,),
            script=script,
            append=append,
            forwards=cloud.forwards(),
            timeout=args.timeout,
            kill_after=args.kill_after,
            kill_on_console=args.kill_on,
        )
        result = boot(spec, workdir, "boot")
        _print_result(result, args.tail)
        print(f"IMDS requests: {len(cloud.imds.requests)}, KMS requests: {len(cloud.kms.requests)}")
    print(f"logs in {workdir}")
    if args.kill_after is not None or args.kill_on:
        return 0 if result.end is BootEnd.KILLED else 1
    return 0 if result.ok else 1


DEMO_GUEST_PY = """
import botocore.session, json, urllib.request
def imds(path, method="GET", headers=None):
    req = urllib.request.Request("http://169.254.169.254" + path, method=method,
                                 headers=headers or {})
    return urllib.request.urlopen(req, timeout=10).read().decode()
token = imds("/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
region = imds("/latest/meta-data/placement/region", headers={"X-aws-ec2-metadata-token": token})
print("ERFS-DEMO-IMDS region=" + region)
kms = botocore.session.get_session().create_client(
    "kms", region_name=region, endpoint_url="%(kms)s")
ctx = {"encryptrootfs:demo": "lab"}
made = kms.generate_data_key(KeyId="%(key)s", NumberOfBytes=64, EncryptionContext=ctx)
back = kms.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=ctx)
print("ERFS-DEMO-KMS roundtrip=%%s" %% ("ok" if back["Plaintext"] == made["Plaintext"] else "bad"))
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def cmd_cloud_check(args: argparse.Namespace) -> int:
    print(
        "encryptrootfs lab cloud check: one boot of the plain image with the KMS and IMDS emulators"
    )
    image, disk = _build(PLAIN, DiskLayout())
    workdir = Path(tempfile.mkdtemp(prefix="erfslab-demo-"))
    with emulated_cloud() as cloud:
        key = cloud.kms.create_key(alias="alias/erfslab-demo")
        guest_py = DEMO_GUEST_PY % {"kms": GUEST_KMS_URL, "key": key}
        script = (
            verify_root_script()
            + "python3 - <<'PYEOF' || echo ERFS-DEMO-FAILED\n"
            + guest_py
            + "PYEOF\n"
        )
        spec = BootSpec(
            kernel=image.kernel,
            initrd=image.initrd,
            root_uuid=disk.root_uuid,
            drives=(disk.drive(snapshot=True),),
            script=script,
            forwards=cloud.forwards(),
            timeout=args.timeout,
        )
        result = boot(spec, workdir, "demo")
        imds_seen = [f"{r.method} {r.path} -> {r.status}" for r in cloud.imds.requests]
        kms_seen = [f"{r.action} -> {r.status}" for r in cloud.kms.requests]
    tree = result.marker("TREE-OK")
    kms_ok = result.marker("DEMO-KMS")
    up = result.guest_uptime_at_boot
    print("--- report ---")
    print(
        f"boot:       {result.end.value} after {result.wall_seconds:.1f}s wall"
        + (f" (multi-user at {up:.1f}s guest uptime)" if up is not None else "")
    )
    print(f"root:       UUID={disk.root_uuid} ({disk.layout.name})")
    print(f"manifest:   {'verified: ' + tree.value if tree else 'NOT verified'}")
    print(f"IMDS:       {len(imds_seen)} request(s): " + ", ".join(imds_seen[:6]))
    print(f"KMS:        {len(kms_seen)} request(s): " + ", ".join(kms_seen))
    print(
        f"KMS in guest (botocore, role credentials from IMDS): "
        f"{kms_ok.value if kms_ok else 'no answer'}"
    )
    print(f"logs:       {workdir}")
    good = result.ok and tree is not None and kms_ok is not None and "ok" in kms_ok.value
    if not good:
        print(result.describe(40), file=sys.stderr)
    return 0 if good else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="encryptrootfs-lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show every command and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse) the image and a disk")
    _add_layout_options(b)
    b.set_defaults(func=cmd_build)
    o = sub.add_parser("boot", help="boot once with the emulators up")
    _add_layout_options(o)
    o.add_argument("--script", help="shell script to run in the guest once it is up")
    o.add_argument(
        "--no-verify", action="store_true", help="without --script: do not verify the test tree"
    )
    o.add_argument("--append", action="append", help="extra kernel argument (repeatable)")
    o.add_argument("--overlay", help="qcow2 overlay to boot (created if missing; persists)")
    o.add_argument("--workdir", help="where console and results logs go (default: a temp dir)")
    o.add_argument("--timeout", type=float, default=300.0)
    o.add_argument("--kill-after", type=float, help="SIGKILL QEMU after this many seconds")
    o.add_argument("--kill-on", help="SIGKILL QEMU when the console matches this regex")
    o.add_argument("--tail", type=int, default=25, help="console lines to print")
    o.set_defaults(func=cmd_boot)
    d = sub.add_parser(
        "demo",
        help="what `make demo` runs: encrypt on boot 1, unlock on boot 2",
        description="Build (or reuse) an image with encryptrootfs installed, boot it twice "
        "against the local KMS and IMDS emulators and report: encrypted on the first boot, "
        "unlocked on the second, the time of each boot and of the data pass.",
    )
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser(
        "cloud-check", help="one plain boot: the guest reaches the emulated IMDS and KMS"
    )
    c.add_argument("--timeout", type=float, default=300.0)
    c.set_defaults(func=cmd_cloud_check)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.debug, prefix="encryptrootfs-lab")
    try:
        return int(args.func(args))
    except EncryptrootfsError as exc:
        if args.debug:
            raise
        print(f"encryptrootfs-lab: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print(
            "encryptrootfs-lab: interrupted; QEMU and the emulators were stopped", file=sys.stderr
        )
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
