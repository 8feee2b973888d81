"""The initrd generator (a shell script) run as a program: here because it runs a shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "encryptrootfs"


def test_the_generator_does_not_glob_the_command_line(tmp_path: Path) -> None:
    """A ``*`` on the kernel command line stays a word; it never expands to file names."""
    generator = PACKAGE / "dracut" / "50encryptrootfs" / "encryptrootfs-generator"
    text = generator.read_text().replace("/proc/cmdline", str(tmp_path / "cmdline"))
    script = tmp_path / "generator"
    script.write_text(text)
    (tmp_path / "cmdline").write_text("root=UUID=1234 * quiet\n")
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "root=LABEL=evil").write_text("")  # what a glob of '*' would find
    stub = tmp_path / "bin"
    stub.mkdir()
    escape = stub / "systemd-escape"
    escape.write_text('#!/bin/sh\nfor a; do last=$a; done\necho "$last" | tr / -\n')
    escape.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{stub}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    subprocess.run(["/bin/sh", str(script), str(out)], cwd=work, env=env, check=True)
    [made] = [p.name for p in out.iterdir()]
    assert made == "-dev-disk-by-uuid-1234.d"
