#!/usr/bin/python3
"""From inside the initramfs: IMDSv2 token + placement/region, then one KMS request.

Prints ERFS-PROBE-* lines on the console and on /dev/ttyS1 (the host's results file).
Stdlib only: this runs before the root filesystem (and its site-packages) is mounted.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import IO, Optional

IMDS = "169.254.169.254"
KMS = "169.254.169.250"

outs: list[IO[str]] = [sys.stdout]
try:  # noqa: SIM105 (contextlib costs an import in the initramfs)
    outs.append(open("/dev/ttyS1", "w"))  # noqa: SIM115 (open for the whole run)
except OSError:
    pass


def say(line: str) -> None:
    for o in outs:
        try:
            o.write(line + "\n")
            o.flush()
        except OSError:
            pass


def request(
    host: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Optional[bytes] = None,
    budget: float = 60.0,
) -> tuple[Optional[int], bytes, int]:
    """One HTTP request, retried while the network is still coming up."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        attempt += 1
        try:
            conn = http.client.HTTPConnection(host, 80, timeout=5)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), attempt
        except OSError as exc:
            if time.monotonic() > deadline:
                say(f"ERFS-PROBE-ERROR host={host} attempts={attempt} error={exc!r}")
                return None, b"", attempt
            time.sleep(0.5)


def main() -> int:
    ok = True
    status, token, attempts = request(
        IMDS, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    say(f"ERFS-PROBE-IMDS-TOKEN status={status} attempts={attempts}")
    region = ""
    if status == 200:
        status, body, _ = request(
            IMDS,
            "GET",
            "/latest/meta-data/placement/region",
            {"X-aws-ec2-metadata-token": token.decode()},
        )
        region = body.decode(errors="replace").strip()
        say(f"ERFS-PROBE-IMDS-REGION status={status} region={region}")
    ok = ok and status == 200
    # An unsigned KMS call: the point is that it reaches the emulator, not that it succeeds.
    status, body, attempts = request(
        KMS,
        "POST",
        "/",
        {"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"},
        body=json.dumps({}).encode(),
    )
    say(f"ERFS-PROBE-KMS status={status} attempts={attempts} bytes={len(body)}")
    ok = ok and status is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
