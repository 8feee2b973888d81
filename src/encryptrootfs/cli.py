"""The ``encryptrootfs`` command line.

Output that is data has a ``--json`` form. Errors are printed as sentences (no traceback unless
``--debug``) and map to :class:`~encryptrootfs.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .errors import EncryptrootfsError, ExitCode
from .log import get_logger, setup_logging
from .providers import provider_for_key, provider_for_token, provider_from_config
from .providers.base import wipe
from .token import token_to_json

if TYPE_CHECKING:
    from .ops.enroll import ProviderFor

# Operator commands import what they need when they run: the initramfs runs only ``boot``, and
# every module it does not import is time saved before the root is unlocked (see bench/).

log = get_logger("cli")

DESCRIPTION = """\
Encrypt a machine's root filesystem in place on its first boot, with a random key that is
stored only wrapped by a cloud KMS (a token in the LUKS2 header), and unlock it unattended on
every later boot.

Commands for image builders and operators:
  install        write the config, enable the dracut module, rebuild the initramfs
  install --check  report whether this machine/image is ready (tools, config, root, network)
  config check   validate the configuration file
  kms check      show credentials, region and key, and do a KMS round trip
  enroll         add a KMS-wrapped key to an existing LUKS2 device
  token show     list the tokens and keyslots of a LUKS2 device
  token verify   unwrap every token through KMS and test its keyslot (opens nothing)
  status         state, tokens, keyslots and last unlock of the root (or given devices)
  rewrap         re-wrap a token's key for another KMS key or region
  recovery-key   add or remove a typeable recovery passphrase (own Argon2id keyslot)
  volumes        the configured data volumes: devices, state, what `volumes up` would do
  removal-check  may the package be removed? (run by its prerm; refuses on an encrypted root)

Run by a systemd unit in the real root on every boot:
  volumes up     format blank data volumes, unlock ours, mount them ([[volumes]])

Run by the initramfs on every boot:
  boot           encrypt the root on its first boot, unlock it on every later one
"""

EPILOG = f"""\
exit codes: {", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)}
configuration: {DEFAULT_CONFIG_PATH} (see docs/config.md)
"""


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


# --- config check -------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.path or args.config)
    config = load_config(path)
    summary = {
        "path": str(path),
        "root": config.root.describe(),
        "mapper_name": config.mapper_name,
        "provider": config.provider.value,
    }
    if config.aws_kms is not None:
        summary["key_id"] = config.aws_kms.key_id
        region, source = config.aws_kms.region_and_source()
        summary["region"] = f"{region} (from the {source})" if region else f"(from {source})"
    if args.json:
        _print_json({"valid": True, **summary})
    else:
        print(f"{path}: valid")
        for key, value in summary.items():
            if key != "path":
                print(f"  {key}: {value}")
    return ExitCode.OK


# --- kms check ----------------------------------------------------------------------------------


def cmd_kms_check(args: argparse.Namespace) -> int:
    provider = provider_from_config(_config(args))
    report = provider.check()
    data = report.as_dict()
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return ExitCode.OK


# --- enroll -------------------------------------------------------------------------------------


def _read_existing_key(args: argparse.Namespace) -> bytearray:
    if args.key_file:
        if args.key_file == "-":
            return bytearray(sys.stdin.buffer.read())
        with open(args.key_file, "rb") as f:
            return bytearray(f.read())
    if sys.stdin.isatty():
        raise EncryptrootfsError(
            "enroll needs a key that opens the device today; nothing was changed.",
            hint="pipe it on stdin (no trailing newline) or pass --key-file PATH",
        )
    return bytearray(sys.stdin.buffer.read())


def _provider_for(config: Config) -> ProviderFor:
    return lambda wrapped: provider_for_token(config, wrapped)


def cmd_enroll_copy(args: argparse.Namespace) -> int:
    from .ops.enroll import enroll_copy

    config = _config(args)
    new_provider = provider_for_key(config, args.key_id, args.region)
    done = enroll_copy(args.device, _provider_for(config), new_provider, token_id=args.token_id)
    result = {
        "device": done.device,
        "source_token_id": done.source_token_id,
        "token_id": done.token_id,
        "keyslots": [int(k) for k in done.keyslots],
        "key_id": done.wrapped.key_id,
        "region": done.wrapped.region,
        "encryption_context": dict(done.wrapped.encryption_context),
    }
    if args.json:
        _print_json(result)
    else:
        print(
            f"{done.device}: token {done.token_id} holds the key of token "
            f"{done.source_token_id} wrapped by {done.wrapped.key_id} in "
            f"{done.wrapped.region} (keyslots {','.join(done.keyslots)}); verified: unwraps "
            "through KMS and opens the keyslots. Either token unlocks."
        )
    return ExitCode.OK


def cmd_enroll(args: argparse.Namespace) -> int:
    if args.copy:
        return cmd_enroll_copy(args)
    if args.key_id or args.region or args.token_id is not None:
        raise EncryptrootfsError(
            "--key-id, --region and --token-id go with --copy; nothing was changed.",
            hint="a plain enroll wraps with the configured key; set it in the configuration",
        )
    from .ops.enroll import enroll

    provider = provider_from_config(_config(args))
    existing = _read_existing_key(args)
    try:
        done = enroll(args.device, provider, existing, keyslot=args.keyslot)
    finally:
        wipe(existing)
    result = {
        "device": done.device,
        "keyslot": done.keyslot,
        "token_id": done.token_id,
        "key_id": done.wrapped.key_id,
        "region": done.wrapped.region,
        "encryption_context": dict(done.wrapped.encryption_context),
    }
    if args.json:
        _print_json(result)
    else:
        print(
            f"{done.device}: enrolled keyslot {done.keyslot} (PBKDF2) with token "
            f"{done.token_id}, wrapped by {done.wrapped.key_id} in {done.wrapped.region}; "
            "verified: unwraps through KMS and opens the keyslot"
        )
    return ExitCode.OK


# --- token show / verify ------------------------------------------------------------------------


def cmd_token_show(args: argparse.Namespace) -> int:
    from .ops.enroll import require_luks2
    from .token import TOKEN_TYPE, read_tokens

    header = require_luks2(args.device)
    tokens = []
    for found in read_tokens(header.tokens).all:
        entry: dict[str, Any] = {"id": found.id, "type": found.type}
        if found.damaged is not None:
            entry["damaged"] = found.damaged
        elif found.token is not None:
            full = token_to_json(found.token)
            # The ciphertext is not secret (only KMS can open it), but it is noise on a screen.
            full.pop("ciphertext", None)
            entry.update(full)
        tokens.append(entry)
    keyslots = [
        {
            "id": int(k),
            "type": s.type,
            "kdf": s.kdf_type,
            "iterations": s.iterations,
            "memory_kib": s.memory,
        }
        for k, s in sorted(header.keyslots.items(), key=lambda kv: int(kv[0]))
    ]
    data = {
        "device": args.device,
        "luks_uuid": header.uuid,
        "reencryption_pending": header.reencryption_pending,
        "tokens": tokens,
        "keyslots": keyslots,
    }
    if args.json:
        _print_json(data)
        return ExitCode.OK
    print(
        f"{args.device}: LUKS2 {header.uuid}"
        + (" (reencryption pending)" if header.reencryption_pending else "")
    )
    for t in tokens:
        if t["type"] != TOKEN_TYPE:
            print(f"  token {t['id']}: {t['type']} (not ours, skipped)")
            continue
        if "damaged" in t:
            print(f"  token {t['id']}: {t['damaged']} (damaged, skipped)")
            continue
        print(
            f"  token {t['id']}: {t['provider']} key {t['key_id']} region {t['region']} "
            f"keyslots {','.join(t['keyslots'])}"
        )
        for k, v in sorted(t["encryption_context"].items()):
            print(f"    context {k} = {v}")
    for s in keyslots:
        kdf = f"{s['kdf']}" + (f" {s['iterations']} iterations" if s["iterations"] else "")
        print(f"  keyslot {s['id']}: {s['type']} {kdf}")
    return ExitCode.OK


def cmd_token_verify(args: argparse.Namespace) -> int:
    from .ops.enroll import all_ok, verify

    provider = provider_from_config(_config(args))
    results = verify(args.device, provider)
    if args.json:
        _print_json(
            [
                {
                    "token_id": r.token_id,
                    "keyslots": list(r.keyslots),
                    "key_id": r.key_id,
                    "ok": r.ok,
                    "reason": r.reason,
                }
                for r in results
            ]
        )
    else:
        for r in results:
            print(f"token {r.token_id} ({r.key_id}): {'OK' if r.ok else 'FAILED'}: {r.reason}")
    return ExitCode.OK if all_ok(results) else ExitCode.VERIFY


# --- status / rewrap / recovery-key (operators) -------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from . import unlock_record
    from .ops import status

    devices = list(args.devices) or [status.configured_root(_config(args))]
    record = unlock_record.read(Path(args.record))
    statuses = status.gather_status(devices, record)
    if args.json:
        _print_json(status.status_json(statuses))
    else:
        sys.stdout.write(status.status_text(statuses))
    unreadable = any(s.state is status.VolumeState.UNREADABLE for s in statuses)
    return ExitCode.DEVICE if unreadable else ExitCode.OK


def cmd_rewrap(args: argparse.Namespace) -> int:
    from .ops.rewrap import rewrap

    config = _config(args)
    new_provider = provider_for_key(config, args.key_id, args.region)
    done = rewrap(args.device, _provider_for(config), new_provider, token_id=args.token_id)
    result = {
        "device": done.device,
        "old_token_id": done.old_token_id,
        "old_key_id": done.old_key_id,
        "old_region": done.old_region,
        "token_id": done.token_id,
        "keyslots": [int(k) for k in done.keyslots],
        "key_id": done.wrapped.key_id,
        "region": done.wrapped.region,
        "resumed": done.resumed,
    }
    if args.json:
        _print_json(result)
    else:
        print(
            f"{done.device}: token {done.token_id} now wraps the key of keyslot(s) "
            f"{','.join(done.keyslots)} with {done.wrapped.key_id} in {done.wrapped.region} "
            f"(verified); token {done.old_token_id} ({done.old_key_id} in {done.old_region}) "
            "was removed. The volume key and the keyslots are unchanged."
        )
    return ExitCode.OK


def cmd_recovery_add(args: argparse.Namespace) -> int:
    from .ops.recovery import add_recovery_key
    from .passphrase import ENTROPY_BITS

    config = _config(args)
    added = add_recovery_key(args.device, _provider_for(config), iter_time_ms=args.iter_time)
    try:
        shown = added.passphrase.decode("ascii")
        if args.json:
            _print_json(
                {
                    "device": added.device,
                    "keyslot": added.keyslot,
                    "token_id": added.token_id,
                    "kdf": "argon2id",
                    "memory_kib": added.memory_kib,
                    "recovery_key": shown,
                }
            )
        else:
            print(
                f"{added.device}: recovery key added in keyslot {added.keyslot} (Argon2id, "
                f"{added.memory_kib} KiB; token {added.token_id} records the keyslot).\n\n"
                f"    {shown}\n\n"
                f"This is the only time it is shown ({ENTROPY_BITS} bits). Write it down and "
                "keep it off this machine. It opens the disk when the key service cannot: at "
                "the boot prompt, or with `cryptsetup open` typed exactly as above."
            )
        del shown
    finally:
        wipe(added.passphrase)
    return ExitCode.OK


def cmd_recovery_remove(args: argparse.Namespace) -> int:
    from .ops.recovery import remove_recovery_key

    config = _config(args)
    removed = remove_recovery_key(args.device, _provider_for(config))
    if args.json:
        _print_json(
            {
                "device": removed.device,
                "keyslots": list(removed.keyslots),
                "token_ids": list(removed.token_ids),
            }
        )
    else:
        slots = ", ".join(str(k) for k in removed.keyslots) or "none left"
        print(
            f"{removed.device}: recovery key removed (keyslot {slots}); the KMS-wrapped "
            "key still opens the device."
        )
    return ExitCode.OK


def _add_operator_parsers(sub: Any) -> None:
    st = sub.add_parser(
        "status",
        help="state, tokens, keyslots and last unlock of managed devices",
        description="For the configured root (found as `encryptrootfs boot` finds it) or the "
        "given devices: the state (encrypted, reencryption-pending with its progress, plain, "
        "not-ours, unreadable), the tokens (provider, key, region, encryption context, "
        "created), the keyslots and which token owns each, and the last unlock recorded by "
        "the initramfs. Reads only; calls no key service. --json: docs/status.md.",
    )
    st.add_argument(
        "devices",
        nargs="*",
        metavar="DEVICE",
        help="devices or image files (default: the configured root)",
    )
    from .unlock_record import DEFAULT_PATH

    st.add_argument(
        "--record",
        default=str(DEFAULT_PATH),
        metavar="PATH",
        help=f"the unlock record to read (default: {DEFAULT_PATH})",
    )
    _add_json(st)
    st.set_defaults(func=cmd_status)

    rw = sub.add_parser(
        "rewrap",
        help="re-wrap a token's key for another KMS key or region",
        description="Unwrap the token's key through KMS, wrap it under --key-id (in "
        "--region), store the new token next to the old one, prove it unwraps and opens its "
        "keyslots, then remove the old token. The volume key and keyslots are not touched; a "
        "kill at any step leaves a device that unlocks. After a kill, run it again with "
        "--token-id naming the old token. Update the configuration's key_id afterwards for "
        "new enrolments.",
    )
    rw.add_argument("device", help="LUKS2 device or image file")
    rw.add_argument(
        "--key-id", required=True, metavar="KEY", help="the new KMS key (ARN, alias/... or key id)"
    )
    rw.add_argument(
        "--region",
        metavar="REGION",
        help="the new key's region (default: from the ARN, else the configured one)",
    )
    rw.add_argument(
        "--token-id",
        type=int,
        metavar="N",
        help="the token to re-wrap (needed when there are several)",
    )
    _add_json(rw)
    rw.set_defaults(func=cmd_rewrap)

    rk = sub.add_parser(
        "recovery-key",
        help="a typeable recovery passphrase",
        description="Add or remove a recovery passphrase, for when the key "
        "service cannot be reached. Both are authorised by the KMS-wrapped key.",
    )
    rk_sub = rk.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    add = rk_sub.add_parser(
        "add",
        help="add a recovery passphrase and print it once",
        description="Make a 200-bit passphrase (8 groups of 5 characters, Crockford base32), "
        "put it in a keyslot of its own (Argon2id, at most 64 MiB) and print it once. A token "
        "of type encryptrootfs-recovery names the keyslot.",
    )
    add.add_argument("device", help="LUKS2 device or image file")
    add.add_argument(
        "--iter-time",
        type=int,
        default=2000,
        metavar="MS",
        help="Argon2id unlock time to aim for on this machine (default: 2000)",
    )
    _add_json(add)
    add.set_defaults(func=cmd_recovery_add)
    rm = rk_sub.add_parser(
        "remove",
        help="remove the recovery passphrase's keyslot (and nothing else)",
        description="Wipe the keyslot the encryptrootfs-recovery token names and remove the "
        "token. cryptsetup first checks that the KMS-wrapped key opens another keyslot.",
    )
    rm.add_argument("device", help="LUKS2 device or image file")
    _add_json(rm)
    rm.set_defaults(func=cmd_recovery_remove)


# --- data volumes ([[volumes]]) -----------------------------------------------------------------


def cmd_volumes(args: argparse.Namespace) -> int:
    from .ops import volumes

    config = _config(args)
    if args.subcommand == "up":
        done, failed = volumes.volumes_up(config)
        if args.json:
            _print_json(
                {
                    "volumes": [r.as_dict() for r in done],
                    "failed": [{"name": n, "error": e.message} for n, e in failed],
                }
            )
        else:
            for r in done:
                print(
                    f"volume {r.name}: {r.action}"
                    + (f", {r.mapper} on {r.mount}" if r.mapper else "")
                )
        error = volumes.exit_failed(failed)
        if error is not None:
            raise error
        return ExitCode.OK
    views = volumes.view_volumes(config)
    if args.json:
        _print_json({"volumes": [v.as_dict() for v in views]})
    else:
        sys.stdout.write(volumes.views_text(views))
    return ExitCode.OK


def _add_volumes_parsers(sub: Any) -> None:
    vol = sub.add_parser(
        "volumes",
        help="data volumes: show them, or bring them up (`volumes up`)",
        description="Without a subcommand: for each [[volumes]] entry, the devices its "
        "selectors match, what is on them and what `volumes up` would do (format, unlock or "
        "refuse, and why). Reads only; calls no key service. See docs/volumes.md.",
    )
    _add_json(vol)
    vol.set_defaults(func=cmd_volumes, subcommand=None)
    vol_sub = vol.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    up = vol_sub.add_parser(
        "up",
        help="format blank volumes, unlock ours, mount them (run at boot by "
        "encryptrootfs-volumes.service)",
        description="For each [[volumes]] entry: create or assemble the RAID0 array, format "
        "a blank device (LUKS2 with a KMS-wrapped key, then the filesystem), or unwrap the "
        "key of one that has our token and open it, then mount it. A device that holds "
        "anything else is refused with the reason and left alone. Safe to run again.",
    )
    _add_json(up)
    up.set_defaults(func=cmd_volumes)


# --- boot (runs in the initramfs) --------------------------------------------------------------


def cmd_boot(args: argparse.Namespace) -> int:
    # Imported here: the boot path is the only one that needs the stage modules.
    from .boot import boot
    from .boot.systemd_initrd import DracutSystemd

    # dracut's systemd initrd is the one integration today (boot/integration.py says what
    # another generator supplies).
    integration = DracutSystemd()
    try:
        mapper = boot(_config(args), integration)
        integration.hand_back(mapper)
    except EncryptrootfsError as exc:
        if args.debug:
            log.exception("failed")
        return integration.fail(exc)
    finally:
        integration.network_down()
    return ExitCode.OK


# --- install / install --check / dracut-files (image build time; helper's block) --------------


def cmd_install(args: argparse.Namespace) -> int:
    from .image.install import check_readiness, install, readiness_exit_code

    root = Path(args.root)
    if args.check:
        items = check_readiness(root)
        if args.json:
            _print_json([i.as_dict() for i in items])
        else:
            for i in items:
                print(f"{i.status.value.upper():8} {i.name}: {i.detail}")
        return int(readiness_exit_code(items))
    result = install(
        root,
        Path(args.config_file) if args.config_file else None,
        regenerate_initramfs=not args.no_regenerate,
        kernels=args.kver or None,
    )
    if args.json:
        _print_json(result.as_dict())
    else:
        print(
            f"config: {result.config}; dracut module: {result.module}; "
            f"dracut.conf.d: {result.dracut_conf}"
        )
        for kver in result.initramfs:
            print(f"initramfs regenerated for {kver}")
        if args.no_regenerate:
            print("initramfs not regenerated (--no-regenerate): run dracut for each kernel")
    return ExitCode.OK


def cmd_dracut_files(args: argparse.Namespace) -> int:
    from .image.initramfs import manifest_lines, plan_initramfs

    config_path = Path(args.config)
    if config_path.exists():
        load_config(config_path)  # an invalid config must fail the dracut run, not the boot
    else:
        log.warning("%s does not exist: the initramfs will have no configuration", config_path)
    plan = plan_initramfs()
    sys.stdout.write("".join(f"{line}\n" for line in manifest_lines(plan, Path(args.stage))))
    return ExitCode.OK


def _add_install_parsers(sub: Any) -> None:
    inst = sub.add_parser(
        "install",
        help="install and enable the dracut module, regenerate the initramfs",
        description="Run as root while building an image (or on the machine): validate the "
        f"configuration and install it as {DEFAULT_CONFIG_PATH}, install the dracut module "
        "50encryptrootfs, enable it for every later dracut run (kernel updates included) and "
        "regenerate the initramfs of every installed kernel. Safe to run again. --check only "
        "reports readiness and changes nothing.",
    )
    inst.add_argument(
        "config_file",
        nargs="?",
        metavar="CONFIG",
        help="configuration to validate and install (default: keep the installed one)",
    )
    inst.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="install into the image tree DIR (dracut runs there with chroot; "
        "/proc, /sys and /dev must be mounted in it)",
    )
    inst.add_argument(
        "--no-regenerate", action="store_true", help="do not run dracut (the image builder runs it)"
    )
    inst.add_argument(
        "--kver",
        action="append",
        metavar="VERSION",
        help="regenerate only this kernel's initramfs (repeatable)",
    )
    inst.add_argument(
        "--check",
        action="store_true",
        help="report tools, Python, dracut, config, root and network; write nothing",
    )
    _add_json(inst)
    inst.set_defaults(func=cmd_install)

    # Hidden: the dracut module's question "which files?", answered by the initramfs's python3.
    files = sub.add_parser("dracut-files")
    files.add_argument(
        "--stage",
        required=True,
        metavar="DIR",
        help="folder for generated files (the trimmed endpoints.json)",
    )
    files.set_defaults(func=cmd_dracut_files)


# --- parser -------------------------------------------------------------------------------------


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encryptrootfs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--debug", action="store_true", help="log every command run (`+ cmd`) and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="configuration file commands")
    config_sub = config.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate the configuration file",
        description="Validate a configuration file: every error names the field path.",
    )
    check.add_argument("path", nargs="?", help="file to check (default: --config)")
    _add_json(check)
    check.set_defaults(func=cmd_config_check)

    kms = sub.add_parser("kms", help="key service commands")
    kms_sub = kms.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    kcheck = kms_sub.add_parser(
        "check",
        help="credentials, region, key and a GenerateDataKey + Decrypt round trip",
        description="Show where credentials and the region come from, resolve the key ARN "
        "and prove a GenerateDataKey + Decrypt round trip with the configured context. "
        "Writes nothing.",
    )
    _add_json(kcheck)
    kcheck.set_defaults(func=cmd_kms_check)

    en = sub.add_parser(
        "enroll",
        help="add a KMS-wrapped key to an existing LUKS2 device",
        description="Add a keyslot opened by a fresh 64-byte KMS data key (PBKDF2, 1000 "
        "iterations: the key has full entropy) and store the key, wrapped by KMS, in an "
        "encryptrootfs token. The wrapped key is proven to unwrap before it gets a keyslot, "
        "and the keyslot is proven to open after; on any failure the device is left as it "
        "was. The existing key that authorises the change is read from stdin or --key-file.",
    )
    en.add_argument("device", help="LUKS2 device or image file")
    en.add_argument(
        "--key-file",
        metavar="PATH",
        help="file holding a key that opens the device today ('-' for stdin)",
    )
    en.add_argument("--keyslot", type=int, metavar="N", help="keyslot number to use")
    en.add_argument(
        "--copy",
        action="store_true",
        help="instead: add a token holding the key of an existing token, wrapped "
        "by --key-id (in --region); it opens the same keyslots (reads no key)",
    )
    en.add_argument("--key-id", metavar="KEY", help="with --copy: the KMS key of the new copy")
    en.add_argument(
        "--region",
        metavar="REGION",
        help="with --copy: the new copy's region (default: from the ARN, else the configured one)",
    )
    en.add_argument(
        "--token-id",
        type=int,
        metavar="N",
        help="with --copy: the token to copy (needed when there are several)",
    )
    _add_json(en)
    en.set_defaults(func=cmd_enroll)

    token = sub.add_parser("token", help="LUKS2 token commands")
    token_sub = token.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    show = token_sub.add_parser(
        "show",
        help="list tokens and keyslots (no secrets)",
        description="List the encryptrootfs tokens (provider, key, region, context, "
        "keyslots) and the keyslots of a LUKS2 device. Foreign tokens are listed by type.",
    )
    show.add_argument("device")
    _add_json(show)
    show.set_defaults(func=cmd_token_show)
    ver = token_sub.add_parser(
        "verify",
        help="unwrap each token through KMS and test its keyslot",
        description="Unwrap every encryptrootfs token through KMS and test that the key "
        "opens its keyslot. Opens no device and writes nothing.",
    )
    ver.add_argument("device")
    _add_json(ver)
    ver.set_defaults(func=cmd_token_verify)

    bt = sub.add_parser(
        "boot",
        help="make the root ready (run by the initramfs, before the root is mounted)",
        description="Decide from what is on disk: a plain root marked for encryption is "
        "converted to LUKS2 in place (first boot); an interrupted conversion is finished; an "
        "encrypted root is unwrapped through KMS and opened as /dev/mapper/<name>. Anything "
        "unexpected stops the boot with the reason and changes nothing. Exit 0 means the "
        "root is ready.",
    )
    bt.set_defaults(func=cmd_boot)
    _add_install_parsers(sub)
    _add_operator_parsers(sub)
    _add_volumes_parsers(sub)
    from .image.removal import add_removal_check_parser

    add_removal_check_parser(sub)
    return parser


def no_core_dumps() -> None:
    """Keys live in this process's memory: no core file, and no ptrace or /proc/<pid>/mem
    access by other processes of the same user (PR_SET_DUMPABLE 0). Best effort: the modules
    may be absent (the initramfs; its unit sets LimitCORE=0 as well)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (ImportError, OSError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    no_core_dumps()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except EncryptrootfsError as exc:
        if args.debug:
            log.exception("failed")
        print(f"encryptrootfs: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("encryptrootfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A file the command was given or needs (--key-file, the unlock record, a device
        # node): a sentence naming it, not a traceback.
        if args.debug:
            log.exception("failed")
        print(f"encryptrootfs: error: {os_error_sentence(exc)}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    except Exception as exc:  # the last resort: a bug, said in one line
        if args.debug:
            log.exception("failed")
        print(
            f"encryptrootfs: error: unexpected {type(exc).__name__}: {exc}; the command "
            "stopped there. Run it again with --debug and report it.",
            file=sys.stderr,
        )
        return int(ExitCode.FAILURE)


def os_error_sentence(exc: OSError) -> str:
    """``cannot open /missing: No such file or directory.`` (plus the second file, if any)."""
    what = exc.strerror or str(exc)
    if exc.filename is None:
        return f"{what}; the command stopped there (run it with --debug for details)."
    files = f"`{exc.filename}`" + (f" -> `{exc.filename2}`" if exc.filename2 else "")
    return (
        f"cannot use {files}: {what}. The command stopped there; check the path and "
        "its permissions, then run it again."
    )


if __name__ == "__main__":
    sys.exit(main())
