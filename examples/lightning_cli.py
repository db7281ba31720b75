"""All five callbacks from a LightningCLI config: nothing of this package in the command line's code.

Run (digits, the teacher first: a plain fit whose CompressionExport writes its checkpoint)::

    .venv/bin/python examples/lightning_cli.py fit --config examples/lightning_cli.yaml \\
        --trainer.max_epochs=4

Every callback argument is typed (``Literal`` where a choice is), so a wrong value fails when the
config is parsed, in one line (``--config`` with ``scope: globl``: "Expected a ... 'global', 'layer', 'lamp'"),
before anything trains.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_compress import ClassificationModule, DigitsDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(ClassificationModule, DigitsDataModule, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
