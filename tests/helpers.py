"""Shared test steps that several test modules run the same way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from st_synth.generation.cache import AnswerCache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous: fixed ports collide with a previous run's
    store still closing or with anything else on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_images_linked(card: str, files: dict[str, bytes], names: list[str]) -> None:
    """Each ``images/NAME.png`` is in ``files`` (path -> bytes, as saved or uploaded), is a PNG that
    decodes to a picture of some size, and is linked from ``card`` as a Markdown image."""
    import io

    from PIL import Image

    for name in names:
        path = f"images/{name}.png"
        assert f"]({path})" in card, f"{path} is not linked from the card"
        assert files.get(path, b"").startswith(PNG_MAGIC), f"{path} is missing or not a PNG"
        with Image.open(io.BytesIO(files[path])) as image:
            image.verify()
            assert image.width > 100 and image.height > 100, image.size


def kill_and_resume(command: list[str], cache: Path, env: dict[str, str], output: Path,
                    after_answers: int = 15, timeout: float = 60.0) -> subprocess.CompletedProcess:  # fmt: skip
    """Start ``command``, SIGKILL it once ``cache`` holds ``after_answers`` answers (it must not have written
    ``output`` by then), run it again to the end and return that second run. The killed run's output goes
    to a file: a pipe nobody reads can block a chatty process."""
    with open(cache.with_suffix(".killed.log"), "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while AnswerCache.count(cache) < after_answers and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed ({proc.returncode})"
    assert not output.exists(), "the killed run wrote its output before it had all its answers"
    return subprocess.run(command, env=env, capture_output=True, text=True)
