"""What every benchmark records beside its figures."""

from __future__ import annotations

import subprocess
from pathlib import Path


def current_commit() -> str:
    """HEAD's short hash in the repository that holds the benchmarks ('' where git cannot say)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)  # fmt: skip
    return done.stdout.strip()
