#!/bin/bash
# The 2016 way to encrypt a root in place (the baseline of the memory benchmark): copy the whole
# filesystem into RAM (tmpfs), luksFormat the partition, open it, make a new filesystem, copy
# everything back. Its memory need is the size of the data. Usage: baseline_2016.sh DEVICE
# Prints "B16 key=value ..." lines; stops at the first failing step, as such a script did.
set -u
dev=$1
src=/mnt/b16src
tmp=/mnt/b16tmp
mkdir -p "$src" "$tmp"
step() { echo "B16 step=$1 uptime=$(cut -d' ' -f1 /proc/uptime)"; }
fail() { echo "B16 result=failed failed_step=$1 rc=$2 copied_mib=$(du -sm "$tmp" 2>/dev/null | cut -f1)"; exit 1; }

step mount
mount -o ro "$dev" "$src" || fail mount $?
used=$(du -sm "$src" | cut -f1)
echo "B16 du_mib=$used"
# tmpfs sized for the data: the copy is limited by memory, not by a tmpfs quota.
mount -t tmpfs -o size=$((used + 64))m b16tmp "$tmp" || fail tmpfs $?
step copy-to-ram
cp -a "$src/." "$tmp/" || fail copy-to-ram $?
echo "B16 copied_mib=$(du -sm "$tmp" | cut -f1)"
umount "$src" || fail umount $?
step luksformat
# A throw-away key kept in the tmpfs (RAM), as the scripts of the time did with a key file.
head -c 64 /dev/urandom > "$tmp/.key"
cryptsetup luksFormat -q --type luks1 --key-file "$tmp/.key" "$dev" || fail luksformat $?
cryptsetup open --key-file "$tmp/.key" "$dev" b16root || fail open $?
rm -f "$tmp/.key"
mkfs.ext4 -q /dev/mapper/b16root || fail mkfs $?
mount /dev/mapper/b16root "$src" || fail mount-new $?
step copy-back
cp -a "$tmp/." "$src/" || fail copy-back $?
umount "$src"
cryptsetup close b16root
umount "$tmp"
echo "B16 result=ok"
