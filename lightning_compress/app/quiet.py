"""What the command line does not print: lines a user of it cannot act on.

Lightning's advertisements for its cloud logger and model registry (a "Tip" on every Trainer) and a deprecation inside
Lightning's own use of torch's pytree (``isinstance(treespec, LeafSpec)``, torch >= 2.9) are dropped;
everything else Lightning and torch report is left as it is. Only the CLI installs this: a user's
own scripts keep their own warnings and logging.
"""

from __future__ import annotations

import logging
import warnings

DROPPED = ("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads")  # their beginnings
LEAF_SPEC = r".*isinstance\(treespec, LeafSpec\)` is deprecated"


class _Dropped(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(DROPPED)


def quiet_lightning() -> None:
    """Install the filters (once: a second call changes nothing)."""
    warnings.filterwarnings("ignore", message=LEAF_SPEC)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Dropped) for f in logger.filters):
            logger.addFilter(_Dropped())
