"""Logging set-up shared by the CLI and the boot path.

Messages go to stderr. In the initramfs stderr is the journal and the console, so lines stay
short and self-contained (a serial console shows them one at a time).
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "encryptrootfs"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(debug: bool = False, *, prefix: str = "encryptrootfs") -> None:
    root = logging.getLogger(LOGGER_NAME)
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    # botocore logs request bodies (which hold ciphertext and, for Decrypt responses, plaintext
    # in base64) at DEBUG: never let it inherit our debug level.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
