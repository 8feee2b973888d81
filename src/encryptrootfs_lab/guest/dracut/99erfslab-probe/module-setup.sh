#!/bin/bash
# dracut defines moddir, initdir, dracutbasedir, systemdutildir and the like before it sources
# this file (dracut-init.sh), so they are never assigned here.
# shellcheck disable=SC2154
# Lab-only dracut module: python3 with the few stdlib modules the probe imports, and a
# pre-mount hook that proves the initramfs can reach the IMDS and KMS emulators.
# Installed only into lab probe images (encryptrootfs_lab.image.PROBE).

check() {
    require_binaries python3 || return 1
    # only with --add erfslab-probe
    return 255
}

depends() {
    echo network
    return 0
}

install() {
    local _py _f
    _py=$(readlink -f "$dracutsysrootdir/usr/bin/python3")
    _py=${_py#"$dracutsysrootdir"}
    inst_binary "$_py"
    ln_r "$_py" /usr/bin/python3
    # The files of every module the probe imports (and the interpreter's start-up set), with
    # their .pyc so nothing compiles at boot.
    while read -r _f; do
        [[ -e "$dracutsysrootdir$_f" ]] && inst_simple "$_f"
    done < <(${dracutsysrootdir:+chroot "$dracutsysrootdir"} "$_py" - <<'PYEOF'
import importlib, importlib.util, os, socket, sys
for m in ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.latin_1",
          "encodings.ascii", "encodings.idna", "os", "site", "http.client", "socket", "json",
          "time", "urllib.parse", "email.parser", "email.feedparser", "__future__", "typing"):
    importlib.import_module(m)
socket.getaddrinfo("localhost", 80)
files = {os.path.join(os.path.dirname(os.__file__), "os.py")}
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None)
    if not f:
        continue
    files.add(f)
    if f.endswith(".py"):
        c = importlib.util.cache_from_source(f)
        if os.path.exists(c):
            files.add(c)
print("\n".join(sorted(files)))
PYEOF
    )
    inst_simple "$moddir/erfslab-probe.py" /usr/bin/erfslab-probe.py
    inst_hook pre-mount 50 "$moddir/erfslab-probe-hook.sh"
}
