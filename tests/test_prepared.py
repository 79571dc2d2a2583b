"""Things prepared in a shared place are built once, by one process, and never read half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from st_synth.common.prepared import build_once

ROOT = Path(__file__).resolve().parents[1]

# Each process asks for the same folder; the build writes one file, dawdles, then the other (as a model's
# config and then its weights), and logs that it ran. Each process then reads both files.
WORKER = """
import sys, time
from pathlib import Path
from st_synth.common.prepared import build_once

target, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(into):
    with log.open("a") as handle:
        handle.write("built\\n")
    (into / "config.json").write_text("{}")
    time.sleep(1.0)
    (into / "model.safetensors").write_text("weights")

folder = build_once(target, build, complete=lambda p: (p / "config.json").is_file())
print((folder / "config.json").read_text(), (folder / "model.safetensors").read_text())
"""


@pytest.mark.parametrize("processes", [2, 3])
def test_many_processes_build_once_and_all_read_the_whole_folder(tmp_path, processes):
    target, log = tmp_path / "cache" / "backbone", tmp_path / "builds.log"
    running = [subprocess.Popen([sys.executable, "-c", WORKER, str(target), str(log)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(processes)]  # fmt: skip
    results = [proc.communicate(timeout=120) for proc in running]
    assert all(proc.returncode == 0 for proc in running), [err for _, err in results]
    assert [out.split() for out, _ in results] == [["{}", "weights"]] * processes
    assert log.read_text().splitlines() == ["built"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".backbone.lock", "backbone"]


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    target = tmp_path / "thing"

    def broken(into: Path) -> None:
        (into / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(target, broken)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".thing.lock"]
    assert build_once(target, lambda into: (into / "whole").write_text("y")) == target
    assert (target / "whole").read_text() == "y"


def test_a_folder_left_incomplete_by_an_older_release_is_built_again(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # the weights never came
    (tmp_path / ".building-model.x1").mkdir()  # a killed build's temporary folder

    def complete(path: Path) -> bool:
        return (path / "model.safetensors").is_file()

    build_once(target, lambda into: (into / "model.safetensors").write_text("w"), complete=complete)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_a_build_that_writes_too_little_is_refused_not_renamed_in(tmp_path):
    """As save_pretrained on a rank other than 0 under torch.distributed: it returns having written nothing."""
    with pytest.raises(RuntimeError, match="incomplete folder"):
        build_once(tmp_path / "model", lambda into: None, complete=lambda p: (p / "config.json").is_file())
    assert not (tmp_path / "model").exists()
