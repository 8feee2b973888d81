"""The one way out to other programs.

Every external command goes through :func:`run`: argv lists only (never a shell), secrets only
on stdin, ``+ cmd`` logged at debug level, and one typed error that carries the command, its
exit code and its stderr. Unit tests replace :data:`_spawn` so that a real command can never
run by accident.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import IO, Callable, Optional, Union

from .errors import EncryptrootfsError, ToolError
from .log import get_logger

log = get_logger("run")

Arg = Union[str, "os.PathLike[str]"]
Secret = Union[bytes, bytearray, memoryview]

# The PATH used when the caller's PATH lacks the sbin folders (cron, some initramfs shells).
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(EncryptrootfsError):
    """A command exited non-zero (or timed out)."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr: str, *, hint: Optional[str] = None
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        what = "timed out" if returncode == -9 else f"failed with exit code {returncode}"
        super().__init__(f"`{shlex.join(self.argv)}` {what}: {last}", hint=hint)


def which(program: str) -> Optional[str]:
    """Where ``program`` is, looking in the sbin folders too."""
    path = os.environ.get("PATH", "")
    return shutil.which(program, path=f"{path}:{_SBIN_PATH}" if path else _SBIN_PATH)


@contextmanager
def secret_fd(secret: Secret) -> Iterator[int]:
    """A pipe whose read end holds ``secret``: for a command that needs a second secret.

    stdin carries one secret; when a command needs two (``luksAddKey``: the existing key and
    the new one) the second goes through ``/dev/fd/N`` of a pipe, which never touches a disk,
    argv or the environment. Pass the fd in ``run(pass_fds=...)``.
    """
    if len(secret) > 65536:
        raise ValueError("a secret larger than a pipe buffer would block the writer")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)
        os.close(write_end)
        write_end = -1
        yield read_end
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)


def _default_spawn(
    argv: Sequence[str],
    stdin: Optional[Secret],
    timeout: Optional[float],
    env: Optional[Mapping[str, str]],
    pass_fds: Sequence[int],
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        list(argv),
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        pass_fds=tuple(pass_fds),
        check=False,
    )


# Replaced in unit tests by a function that fails the test.
_spawn: Callable[
    [Sequence[str], Optional[Secret], Optional[float], Optional[Mapping[str, str]], Sequence[int]],
    subprocess.CompletedProcess[bytes],
] = _default_spawn


def _resolve(argv: Sequence[Arg], has_stdin: bool) -> list[str]:
    """argv with the program's full path; a missing program is a sentence. Logs ``+ cmd``."""
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("a command needs a program")
    program = which(args[0]) if "/" not in args[0] else args[0]
    if program is None or not os.path.exists(program):
        raise ToolError(
            f"The program `{args[0]}` is not installed (needed for `{shlex.join(args)}`).",
            hint="install it (see `encryptrootfs install --check`) and try again",
        )
    args[0] = program
    log.debug("+ %s%s", shlex.join(args), " <stdin>" if has_stdin else "")
    return args


def run(
    argv: Sequence[Arg],
    *,
    stdin: Optional[Secret] = None,
    check: bool = True,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    pass_fds: Sequence[int] = (),
    hint: Optional[str] = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` and return its result; raise :class:`CommandError` when it fails.

    ``stdin`` is where secrets go: it is never logged. ``env`` adds to the environment.
    """
    args = _resolve(argv, stdin is not None)
    full_env = {**os.environ, **env} if env is not None else None
    # The caller's buffer itself (a bytearray it wipes), not a bytes copy nobody can wipe:
    # subprocess writes any bytes-like input.
    data = stdin
    try:
        result = _spawn(args, data, timeout, full_env, pass_fds)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -9, f"no answer within {exc.timeout:.0f} s", hint=hint) from None
    finally:
        data = None  # drop our copy of the secret as early as the language lets us
    if check and result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        raise CommandError(args, result.returncode, stderr, hint=hint)
    return result


def _default_popen(
    argv: Sequence[str], env: Optional[Mapping[str, str]], pass_fds: Sequence[int]
) -> subprocess.Popen[bytes]:
    # subprocess.Popen is looked up at call time so that the unit tier's patch of it holds.
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        pass_fds=tuple(pass_fds),
    )


# The seam of run_streaming(): unit tests replace it (or rely on the patched subprocess.Popen);
# header tests wrap it to reach the process (e.g. to kill it mid-way, as a crash would).
_popen: Callable[
    [Sequence[str], Optional[Mapping[str, str]], Sequence[int]], subprocess.Popen[bytes]
] = _default_popen


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    sink.append(stream.read())


def run_streaming(
    argv: Sequence[Arg],
    *,
    on_line: Callable[[str], None],
    stdin: Optional[Secret] = None,
    env: Optional[Mapping[str, str]] = None,
    pass_fds: Sequence[int] = (),
    hint: Optional[str] = None,
) -> int:
    """Run a long command, calling ``on_line`` with each line of its stdout as it comes.

    For commands that report progress (``cryptsetup reencrypt --progress-json``). ``stdin`` is
    written once and closed, as with :func:`run`; stderr is collected for the error. An
    exception raised by ``on_line`` stops the command (SIGKILL) and propagates. Returns the
    exit code (0); a non-zero exit raises :class:`CommandError`. A command killed by signal N
    reports exit code 128 + N (as a shell does), and its stderr ends with the signal name.
    """
    args = _resolve(argv, stdin is not None)
    full_env = {**os.environ, **env} if env is not None else None
    proc = _popen(args, full_env, pass_fds)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr_chunks: list[bytes] = []
    # stderr is drained on its own thread: a command that fills the stderr pipe while we wait
    # on stdout would otherwise block forever.
    drainer = threading.Thread(target=_drain, args=(proc.stderr, stderr_chunks), daemon=True)
    drainer.start()
    try:
        # A command that exits before reading stdin breaks the pipe; its exit code and
        # stderr say why, so that is what gets reported.
        with suppress(BrokenPipeError):
            try:
                if stdin is not None:
                    proc.stdin.write(stdin)
            finally:
                proc.stdin.close()
        for raw in proc.stdout:
            on_line(raw.decode(errors="replace").rstrip("\r\n"))
        returncode = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        drainer.join()
        proc.stderr.close()
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        stderr += f"\nkilled by {name}"
        returncode = 128 - returncode
    if returncode != 0:
        raise CommandError(args, returncode, stderr, hint=hint)
    return returncode
