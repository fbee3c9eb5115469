"""Shared by the job entrypoints: make the submitted working dir importable, then run the CLI.

Each ``jobs/<file>.py`` names its stage; the stage registry (``medisyn/stages.py``) records
which file submits which stage, and a test keeps the two in step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(command: str) -> None:
    from medisyn.cli import main
    from medisyn.stages import STAGE_BY_NAME

    if command != "pipeline" and command not in STAGE_BY_NAME:
        raise SystemExit(f"jobs: {command!r} is not a stage; known: {', '.join(STAGE_BY_NAME)}")
    sys.exit(main([command, *sys.argv[1:]]))
