#!/bin/bash
# dracut defines moddir, initdir, dracutbasedir, systemdutildir and the like before it sources
# this file (dracut-init.sh), so they are never assigned here.
# shellcheck disable=SC2154
# dracut module "encryptrootfs": python3 with exactly what `encryptrootfs boot` imports, this
# package, a pruned botocore, the CA bundle, cryptsetup and the partition and file-system
# tools, and a systemd unit that runs `python3 -m encryptrootfs boot` before the root is
# checked or mounted. The file list comes from `encryptrootfs dracut-files`, computed by the
# same python3 that goes into the initramfs (see src/encryptrootfs/image/initramfs.py).
#
# Enabled by `encryptrootfs install` (/etc/dracut.conf.d/50-encryptrootfs.conf), so every
# later dracut run, e.g. a kernel update, includes it. systemd initrds only.

# called by dracut
check() {
    # The file list is computed by running the image's python3; with --sysroot that python3
    # would have to run on this host. Image builders run dracut inside the image (chroot).
    if [[ -n $dracutsysrootdir ]]; then
        derror "encryptrootfs: dracut --sysroot is not supported; run dracut in the image (chroot)"
        return 1
    fi
    require_binaries python3 cryptsetup || return 1
    # Only when asked for (add_dracutmodules / --add): never guessed from the host.
    return 255
}

# called by dracut
depends() {
    local _net=systemd-networkd _handler
    # An explicitly chosen backend wins; otherwise systemd-networkd when it can be included
    # (dracut's 01systemd-networkd needs dbus, and networkd is ~9 s faster than dhclient),
    # else dracut's "network" module, which falls back to network-legacy (dhclient).
    for _handler in network-legacy network-manager network-wicked connman; do
        dracut_module_included "$_handler" && _net=network
    done
    if [[ $_net == systemd-networkd ]]; then
        if [[ ! -x $systemdutildir/systemd-networkd ]] \
            || ! { find_binary dbus-broker > /dev/null || find_binary dbus-daemon > /dev/null; }; then
            _net=network
        fi
    fi
    # The recovery key prompt is answered through systemd's console password agent; dracut
    # 056 and later have a module for it (older ones: install() below adds the agent itself).
    local _ask=
    for _handler in "$dracutbasedir"/modules.d/[0-9][0-9]systemd-ask-password; do
        [[ -d $_handler ]] && _ask=systemd-ask-password
    done
    echo systemd dm rootfs-block "$_net" $_ask
    return 0
}

# called by dracut
installkernel() {
    # dm-crypt and the ciphers of the LUKS2 format the first boot writes (aes-xts-plain64,
    # sha256 for PBKDF2), whatever the host uses today: at image build time nothing is
    # encrypted yet, so host-only detection (dracut's crypt module) would find none of them.
    hostonly='' instmods dm_mod dm_crypt crypto-xts crypto-aes crypto-sha256 crypto-ecb
    # The first boot may mount the ESP (vfat) to point GRUB's stub at a new /boot.
    hostonly='' instmods vfat nls_cp437 nls_ascii nls_iso8859-1 nls_utf8
}

# called by dracut
install() {
    local _python _stage _manifest _kind _a _b
    local -a _files=() _programs=() _optional=()

    _python=$(find_binary python3) || {
        dfatal "encryptrootfs: python3 not found"
        exit 1
    }
    _stage="${DRACUT_TMPDIR:?}/encryptrootfs"
    # One python3 run answers everything; a failure stops dracut (exit 1) so that no
    # initramfs that cannot unlock the root is ever written.
    if ! _manifest=$("$_python" -I -m encryptrootfs dracut-files --stage "$_stage"); then
        dfatal "encryptrootfs: \`python3 -m encryptrootfs dracut-files\` failed (see above)"
        exit 1
    fi

    while IFS=$'\t' read -r _kind _a _b; do
        case $_kind in
            binary) inst_binary "$_a" || _encryptrootfs_fail "$_a" ;;
            link) [[ -e ${initdir}${_b} ]] || ln_r "$_a" "$_b" ;;
            staged | bytecode) inst_simple "$_a" "$_b" || _encryptrootfs_fail "$_b" ;;
            file | library) _files+=("$_a") ;;
            config) inst_simple "$_a" || _encryptrootfs_fail "$_a" ;;
            program) _programs+=("$_a") ;;
            program\?) _optional+=("$_a") ;;
            '') ;;
            *) _encryptrootfs_fail "unknown manifest line: $_kind" ;;
        esac
    done <<< "$_manifest"

    # One dracut-install call for the ~800 modules, byte code and libraries (-l resolves the
    # shared libraries of the extension modules).
    inst_multiple "${_files[@]}" || _encryptrootfs_fail "python files"
    inst_multiple "${_programs[@]}" || _encryptrootfs_fail "programs: ${_programs[*]}"
    # File-system tools of file systems this image may not use: missing = that fs refused.
    inst_multiple -o "${_optional[@]}"

    inst_simple "$moddir/encryptrootfs.service" "$systemdsystemunitdir/encryptrootfs.service"
    inst_script "$moddir/encryptrootfs-generator" \
        "$systemdutildir/system-generators/encryptrootfs-generator"
    # Package data may lose its mode bits on the way (wheels, copies); systemd skips a
    # generator that is not executable.
    chmod 0755 "${initdir}$systemdutildir/system-generators/encryptrootfs-generator"
    inst_multiple systemd-escape
    $SYSTEMCTL -q --root "$initdir" enable encryptrootfs.service

    # The recovery key prompt (`python3 -m encryptrootfs boot` asks through the ask-password
    # protocol when KMS is failing): the console agent, started by its path unit as soon as a
    # question is written to /run/systemd/ask-password.
    inst_multiple -o \
        "$systemdsystemunitdir"/systemd-ask-password-console.path \
        "$systemdsystemunitdir"/systemd-ask-password-console.service \
        "$systemdsystemunitdir"/sysinit.target.wants/systemd-ask-password-console.path
    if inst_multiple systemd-tty-ask-password-agent \
        && [[ -e ${initdir}$systemdsystemunitdir/systemd-ask-password-console.path ]]; then
        [[ -e ${initdir}$systemdsystemunitdir/sysinit.target.wants/systemd-ask-password-console.path ]] \
            || $SYSTEMCTL -q --root "$initdir" add-wants sysinit.target systemd-ask-password-console.path
    else
        dwarn "encryptrootfs: no systemd console password agent: the recovery key prompt cannot be answered"
    fi

    if dracut_module_included systemd-networkd; then
        inst_simple "$moddir/90-encryptrootfs.network" "$systemdnetwork/90-encryptrootfs.network"
    elif dracut_module_included network-legacy; then
        # dhclient is started only for rd.neednet=1 with an ip= setting.
        inst_simple "$moddir/encryptrootfs-network-legacy.conf" "/etc/cmdline.d/50-encryptrootfs.conf"
    fi
}

_encryptrootfs_fail() {
    dfatal "encryptrootfs: could not install $1"
    exit 1
}
