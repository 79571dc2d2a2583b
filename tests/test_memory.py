"""release_memory hands the C heap's free pages back (glibc), so a stage does not start on top of the last
one's freed activations; measured in a fresh process, where nothing else holds the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from st_synth.common.memory import current_rss_mb, peak_rss_mb, release_memory

# Blocks of 100 KiB come from malloc's heap (below its mmap threshold). All but the last are freed, so the
# free space sits below a live block: malloc keeps it resident until it is trimmed.
PROBE = """
import sys
from st_synth.common.memory import current_rss_mb, release_memory
blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]
keep = blocks[-1]
del blocks
before = current_rss_mb()
trimmed = release_memory() if sys.argv[1] == "release" else None
print(before, current_rss_mb(), trimmed)
"""


def _run(mode: str) -> tuple[int, int, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout
    before, after, trimmed = out.split()
    return int(before), int(after), trimmed


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's, /proc is Linux's",
)
def test_release_memory_returns_the_freed_heap_to_the_system():
    before, after, trimmed = _run("keep")
    assert before - after < 50, (
        "without a trim, the freed 300 MB stay resident (else this test proves nothing)"
    )
    assert before > 250
    before, after, trimmed = _run("release")
    assert trimmed == "True"
    assert before - after > 250, f"{before} MB resident before the trim, {after} MB after"


def test_memory_figures_are_plain_megabytes():
    now = current_rss_mb()
    assert peak_rss_mb() > 0
    assert now is None or 0 < now <= peak_rss_mb() + 1
    assert isinstance(release_memory(), bool)
