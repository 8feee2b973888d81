"""What the vm tier's one shared first boot leaves (the ``encrypted_root`` fixture in
tests/vm/conftest.py), for the tests that boot it."""

from __future__ import annotations

from dataclasses import dataclass

from encryptrootfs_lab.emulators.kms import KmsRequest
from encryptrootfs_lab.image import Image
from encryptrootfs_lab.layout import Disk
from encryptrootfs_lab.qemu import BootResult


@dataclass(frozen=True)
class EncryptedRoot:
    """A plain root after its first boot (flattened to a raw file): every later-boot case boots
    a copy-on-write overlay of ``disk``; ``first`` and ``requests`` are what that first boot
    printed and asked KMS."""

    image: Image
    plain: Disk
    disk: Disk
    first: BootResult
    requests: tuple[KmsRequest, ...]
    key_arn: str
