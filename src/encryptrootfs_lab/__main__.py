"""``python -m encryptrootfs_lab``: the lab runs from the checkout (``PYTHONPATH=src``), never
from an installed wheel, which holds only the product."""

import sys

from .cli import main

sys.exit(main())
