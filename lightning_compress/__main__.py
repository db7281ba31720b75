"""``python -m lightning_compress``: the same as the ``lightning-compress`` command."""

import sys

from lightning_compress.config.trust import drop_current_folder

drop_current_folder()  # a recipe imports only from the environment and the folders it lists, not from here

from lightning_compress.app.cli import main  # noqa: E402

sys.exit(main())
