"""``python -m lightning_compress``: the same as the ``lightning-compress`` command."""

import sys

from lightning_compress.app.cli import main

sys.exit(main())
