"""The ``lightning-compress`` command. Exit codes: 0 ok, 2 bad input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_compress.errors import CompressionConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-compress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a CNN dense, with 90%% GMP and with GMP + QAT int8 on embedded data; print the table"
    )
    demo.add_argument("--model", default="cnn_small", help="a registered model name (default: cnn_small)")
    demo.add_argument("--data", default="mnist5k", help="digits or mnist5k (default: mnist5k)")
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--sparsity", type=float, default=0.9)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from lightning_compress.demo import run_demo

            run_demo(args.model, args.data, args.epochs, args.sparsity, args.seed)
    except CompressionConfigError as err:
        print(f"lightning-compress: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
