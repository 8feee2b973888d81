"""``python3 -m encryptrootfs``: the initramfs runs the CLI this way."""

import sys

from .cli import main

sys.exit(main())
