"""The real ``encryptrootfs`` command, run as a user would, against the test's emulators."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator


def emulator_config(
    path: Path, kms: KmsEmulator, imds: ImdsEmulator, context: Optional[Mapping[str, str]] = None
) -> Path:
    """A configuration naming the test key, with both emulators as endpoints."""
    text = f"""
[providers.aws_kms]
key_id = "alias/encryptrootfs-test"
endpoint_url = "{kms.url}"
imds_endpoint = "{imds.url}"
total_timeout = 20.0
imds_attempts = 3
imds_timeout = 1.0
"""
    if context:
        text += "\n[providers.aws_kms.encryption_context]\n"
        text += "".join(f'{k} = "{v}"\n' for k, v in context.items())
    path.write_text(text)
    return path


class Cli:
    """Runs the real `encryptrootfs` command and keeps everything it printed."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.transcript: list[str] = []

    def __call__(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
        r = subprocess.run(
            [sys.executable, "-m", "encryptrootfs", "--debug", "--config", str(self.config), *args],
            input=stdin.decode("latin-1"),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        self.transcript += [r.stdout, r.stderr]
        return r
