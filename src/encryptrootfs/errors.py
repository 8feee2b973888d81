"""Exit codes and the one error type every layer raises.

An error is a sentence for the operator: what happened, what was (or was not) changed on disk,
and what to do next. The CLI prints it without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional


class ExitCode(IntEnum):
    """Process exit codes of the ``encryptrootfs`` command; documented in the README."""

    OK = 0
    FAILURE = 1  # anything not covered below
    USAGE = 2  # argparse's own code for bad arguments
    CONFIG = 3  # the configuration file is missing or invalid
    TOOL = 4  # a required program is missing or too old
    DEVICE = 5  # the device is not what was expected (not LUKS2, ambiguous, missing)
    KMS = 6  # the key service refused or could not be reached
    VERIFY = 7  # a token did not unwrap or did not open its keyslot
    REFUSED = 8  # a safety check stopped the operation before anything was written


class EncryptrootfsError(Exception):
    """An expected failure, explained as a sentence plus an optional hint."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(EncryptrootfsError):
    """The configuration is invalid; the message starts with the field path."""

    exit_code = ExitCode.CONFIG


class ToolError(EncryptrootfsError):
    """A required external program is missing or unusable."""

    exit_code = ExitCode.TOOL


class DeviceError(EncryptrootfsError):
    """A device is not in the state an operation needs."""

    exit_code = ExitCode.DEVICE


class KeyServiceError(EncryptrootfsError):
    """The key provider could not wrap or unwrap a key.

    ``retryable`` says whether trying again later can help (network down, throttled, IMDS not
    answering yet) or not (access denied, ciphertext or context mismatch, key disabled).
    """

    exit_code = ExitCode.KMS

    def __init__(
        self, message: str, *, hint: Optional[str] = None, retryable: bool = False
    ) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class VerifyError(EncryptrootfsError):
    """A wrapped key did not round-trip or did not open its keyslot."""

    exit_code = ExitCode.VERIFY


class RefusedError(EncryptrootfsError):
    """A safety check refused the operation; nothing was written."""

    exit_code = ExitCode.REFUSED
