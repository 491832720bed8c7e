"""The ``peft-layersched`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-layersched", description="Layer-scheduling LoRA for Hugging Face PEFT."
    )
    parser.add_argument("--version", action="version", version=f"peft-layersched {_version()}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
