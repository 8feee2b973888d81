"""Asking a person for a secret through systemd's password agents.

systemd's ask-password protocol (https://systemd.io/PASSWORD_AGENTS/): the asker writes an
``ask.*`` file into ``/run/systemd/ask-password/`` naming a datagram socket; whichever agent
runs (in the initrd: ``systemd-tty-ask-password-agent --watch --console``, started by
``systemd-ask-password-console.path``; Plymouth when present) shows the message, reads the
answer without echo and sends ``+<answer>`` (or ``-`` for "cancelled") to the socket.

This is the protocol rather than ``systemd-ask-password`` run as a command because the
question has to be *withdrawn* when KMS answers first: removing the ask file makes every agent
drop the prompt at once, while a child process could only be killed and leave its agent
prompting for a dead asker. The answer arrives in a ``bytearray`` that is overwritten after
use, never in argv, the environment or a log; only answers sent by root (the agents run as
root; checked with SCM_CREDENTIALS) are accepted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..log import get_logger
from ..providers.base import wipe

log = get_logger("ask_password")

ASK_DIR = Path("/run/systemd/ask-password")
MAX_ANSWER = 4096  # systemd's own limit for a password line is lower (LINE_MAX)
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Question:
    """What the agents show. ``id`` lets agents recognise a repeated question."""

    message: str
    id: str
    icon: str = "drive-harddisk"


def ask_file_text(question: Question, pid: int, socket_path: str) -> str:
    """The ``ask.*`` file for ``question``; ``NotAfter=0``: no deadline (the asker withdraws
    the question itself)."""
    for value in (question.message, question.id, question.icon):
        if "\n" in value:
            raise ValueError("ask-password fields are single lines")
    return (
        "[Ask]\n"
        f"PID={pid}\n"
        f"Socket={socket_path}\n"
        "AcceptCached=0\n"
        "Echo=0\n"
        "NotAfter=0\n"
        f"Message={question.message}\n"
        f"Icon={question.icon}\n"
        f"Id={question.id}\n"
    )


def parse_answer(datagram: bytearray) -> Optional[bytearray]:
    """An agent's datagram as the answer (a new bytearray), or None for "cancelled" or
    anything that is not an answer. The caller wipes ``datagram``.

    The answer is ``+`` and a list of NUL-terminated strings (systemd's agents always end it
    with a NUL; several strings only come from a key cache, which this question does not
    accept): the first string is what was typed.
    """
    if datagram[:1] != b"+":
        return None
    end = datagram.find(b"\0", 1)
    return bytearray(datagram[1 : end if end >= 0 else len(datagram)])


def _sender_uid(ancdata: list[tuple[int, int, bytes]]) -> Optional[int]:
    for level, kind, data in ancdata:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            _, uid, _ = _UCRED.unpack(data[: _UCRED.size])
            return int(uid)
    return None


class PasswordRequest:
    """One question on the agents: created by ``open()``, answered by ``wait()``, withdrawn
    by ``close()`` (always, in ``finally`` or a ``with`` block)."""

    def __init__(
        self, question: Question, *, directory: Path = ASK_DIR, agent_uid: int = 0
    ) -> None:
        self.question = question
        self.directory = directory
        self.agent_uid = agent_uid
        self.name = os.urandom(8).hex()
        self.socket_path = directory / f"sck.{self.name}"
        self.ask_path = directory / f"ask.{self.name}"
        self._sock: Optional[socket.socket] = None
        self.cancelled = False

    def open(self) -> PasswordRequest:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(self.socket_path))
            # Written under another name and renamed: agents react to the rename and must never
            # read half a file (their inotify watch is IN_CLOSE_WRITE | IN_MOVED_TO).
            tmp = self.directory / f".tmp.{self.name}"
            tmp.write_text(ask_file_text(self.question, os.getpid(), str(self.socket_path)))
            os.replace(tmp, self.ask_path)
        except BaseException:
            self.close()
            raise
        return self

    def wait(self, timeout: float) -> Optional[bytearray]:
        """The answer, or None when none came within ``timeout`` seconds (or it was
        "cancelled", or not from root: the question stays up)."""
        assert self._sock is not None, "open() first"
        self._sock.settimeout(timeout)
        buf = bytearray(MAX_ANSWER)
        try:
            try:
                size, ancdata, flags, _ = self._sock.recvmsg_into(
                    [buf], socket.CMSG_SPACE(_UCRED.size)
                )
            except (socket.timeout, BlockingIOError, InterruptedError):
                return None
            if flags & socket.MSG_TRUNC:
                log.warning("ignored an answer longer than %d bytes", MAX_ANSWER)
                return None
            uid = _sender_uid(ancdata)
            if uid != self.agent_uid:
                log.warning(
                    "ignored an answer from uid %s (only %d may answer)", uid, self.agent_uid
                )
                return None
            view = bytearray(buf[:size])
            try:
                answer = parse_answer(view)
                # "-": the agent gave up on this question (Ctrl-C, Ctrl-D); agents never show
                # a question again once answered, so the caller asks a new one.
                self.cancelled = answer is None and view[:1] == b"-"
                return answer
            finally:
                wipe(view)
        finally:
            wipe(buf)

    def close(self) -> None:
        """Withdraw the question (agents stop prompting) and remove the socket."""
        for path in (self.ask_path, self.socket_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PasswordRequest:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(
    question: Question,
    withdraw: threading.Event,
    *,
    directory: Path = ASK_DIR,
    agent_uid: int = 0,
    poll: float = 0.5,
) -> Optional[bytearray]:
    """Ask until an answer comes (returned; the caller wipes it) or ``withdraw`` is set
    (None; the question is taken off every agent)."""
    while not withdraw.is_set():
        with PasswordRequest(question, directory=directory, agent_uid=agent_uid) as request:
            while not withdraw.is_set() and not request.cancelled:
                answer = request.wait(poll)
                if answer is not None:
                    return answer
    return None
