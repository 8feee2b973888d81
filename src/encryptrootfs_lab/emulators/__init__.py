"""Local stand-ins for the AWS services encryptrootfs talks to, on 127.0.0.1 only.

- :class:`KmsEmulator`: moto's KMS over real HTTP, behind a middleware that logs requests,
  injects faults (throttling, access denied, unreachable) and enforces key states that moto
  ignores (disabled, pending deletion).
- :class:`ImdsEmulator`: a stdlib IMDSv2 server (session tokens with TTL, role credentials,
  region, instance id, identity document) with fault and delay knobs.

Both run in-process on a thread (pytest fixtures) or from the lab CLI (for QEMU guests).
"""

from __future__ import annotations

from .imds import ImdsEmulator, ImdsRequest
from .kms import KmsEmulator, KmsRequest

__all__ = ["ImdsEmulator", "ImdsRequest", "KmsEmulator", "KmsRequest"]
