"""Shared by the job entrypoints: make the submitted working dir importable, then run the CLI."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(command: str) -> None:
    from medisyn.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
