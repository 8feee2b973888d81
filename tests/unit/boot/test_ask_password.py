"""The ask-password protocol: the ask file, an agent's answer, withdrawal, who may answer."""

from __future__ import annotations

import configparser
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from encryptrootfs.boot import ask_password
from encryptrootfs.boot.ask_password import PasswordRequest, Question, ask, ask_file_text

QUESTION = Question("Recovery key for /dev/vda1 (the root, root):", id="encryptrootfs:/dev/vda1")


def _ask_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("ask.*")) if folder.exists() else []


def agent(
    folder: Path,
    replies: list[bytes],
    *,
    seen: Optional[list[dict[str, str]]] = None,
    timeout: float = 10.0,
) -> threading.Thread:
    """A stand-in for systemd-tty-ask-password-agent: answers each new ask file in turn."""

    def run() -> None:
        answered: set[str] = set()
        deadline = time.monotonic() + timeout
        while replies and time.monotonic() < deadline:
            for path in _ask_files(folder):
                if path.name in answered:
                    continue
                parser = configparser.ConfigParser(interpolation=None)
                parser.optionxform = str  # type: ignore[assignment,method-assign]
                try:
                    parser.read_string(path.read_text())
                except FileNotFoundError:
                    continue
                fields = dict(parser["Ask"])
                if seen is not None:
                    seen.append(fields)
                answered.add(path.name)
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(replies.pop(0), fields["Socket"])
                break
            time.sleep(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_ask_file_has_the_fields_agents_read() -> None:
    text = ask_file_text(QUESTION, 1234, "/run/systemd/ask-password/sck.ab")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    assert dict(parser["Ask"]) == {
        "PID": "1234",
        "Socket": "/run/systemd/ask-password/sck.ab",
        "AcceptCached": "0",
        "Echo": "0",
        "NotAfter": "0",
        "Message": QUESTION.message,
        "Icon": "drive-harddisk",
        "Id": "encryptrootfs:/dev/vda1",
    }


def test_a_field_with_a_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="single lines"):
        ask_file_text(Question("two\nlines", id="x"), 1, "/s")


def test_answer_parsing() -> None:
    # systemd-tty-ask-password-agent ends every answer with a NUL
    assert ask_password.parse_answer(bytearray(b"+k3y\0")) == bytearray(b"k3y")
    assert ask_password.parse_answer(bytearray(b"+first\0second\0")) == bytearray(b"first")
    assert ask_password.parse_answer(bytearray(b"+k3y")) == bytearray(b"k3y")
    assert ask_password.parse_answer(bytearray(b"+")) == bytearray()
    assert ask_password.parse_answer(bytearray(b"-")) is None
    assert ask_password.parse_answer(bytearray(b"")) is None


def test_the_agents_answer_is_returned_and_the_question_withdrawn(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []
    helper = agent(tmp_path, [b"+7kq2m-x9d4a\0"], seen=seen)
    answer = ask(QUESTION, threading.Event(), directory=tmp_path, agent_uid=os.getuid(), poll=0.05)
    helper.join()
    assert answer == bytearray(b"7kq2m-x9d4a")
    assert seen and seen[0]["PID"] == str(os.getpid()) and seen[0]["Echo"] == "0"
    assert list(tmp_path.iterdir()) == [], "the ask file and socket must be gone"


def test_withdrawing_takes_the_question_off_the_agents(tmp_path: Path) -> None:
    withdraw = threading.Event()
    result: list[Optional[bytearray]] = []
    t = threading.Thread(
        target=lambda: result.append(
            ask(QUESTION, withdraw, directory=tmp_path, agent_uid=os.getuid(), poll=0.05)
        )
    )
    t.start()
    deadline = time.monotonic() + 5
    while not _ask_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _ask_files(tmp_path), "no question was asked"
    withdraw.set()
    t.join(timeout=5)
    assert result == [None]
    assert _ask_files(tmp_path) == []


def test_a_cancelled_question_is_asked_again(tmp_path: Path) -> None:
    """ "-" (the person pressed Ctrl-C at the agent): agents never show an answered question
    again, so a new one is asked."""
    seen: list[dict[str, str]] = []
    helper = agent(tmp_path, [b"-", b"+second\0"], seen=seen)
    answer = ask(QUESTION, threading.Event(), directory=tmp_path, agent_uid=os.getuid(), poll=0.05)
    helper.join()
    assert answer == bytearray(b"second")
    assert len(seen) == 2 and seen[0]["Socket"] != seen[1]["Socket"]


def test_an_answer_from_another_user_is_ignored(tmp_path: Path) -> None:
    """Only the agents' user (root in the initrd) may answer; here: a uid nobody has."""
    with PasswordRequest(QUESTION, directory=tmp_path, agent_uid=os.getuid() + 4242) as request:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"+intruder", str(request.socket_path))
        assert request.wait(0.5) is None
        assert request.ask_path.exists(), "the question must stay up"


def test_no_answer_within_the_wait_is_none(tmp_path: Path) -> None:
    with PasswordRequest(QUESTION, directory=tmp_path, agent_uid=os.getuid()) as request:
        assert request.wait(0.05) is None
        assert not request.cancelled
