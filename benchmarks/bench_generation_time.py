"""Where the main job's generation time goes: the local llama.cpp server's own per-request timings.

Runs the generate section of ``recipes/configs/local-smollm2.yaml`` (``--num_examples`` to shorten it) against
the same llama.cpp server the main job starts (``LocalLLMServer``'s command, with llama-cpp-python's verbose
timings on), with an empty answer cache, one request at a time as the main job sends them. The server prints,
for each request, the prompt tokens it read (after the beginning it kept from the previous request), the time
it took, and the tokens it wrote and their time; the answer cache holds the same requests in the same order,
so each is labelled JSON (a grammar-constrained answer: free generation and brainstorms) or prose (the
retellings).

    python benchmarks/bench_generation_time.py                 # the whole main job's generation
    python benchmarks/bench_generation_time.py --num_examples 60

Writes ``benchmarks/results/generation-time.json`` and ``.md``: wall time, server start, reading and writing
(seconds, tokens, tokens per second) for JSON and prose answers, the rest of each request's time in the server
(sampling, which llama.cpp's read/write timings leave out), and what is outside the server (the client, HTTP,
the corpus, saving).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from _results import current_commit

from st_synth.generation.local_llm import LocalLLMServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "recipes" / "configs" / "local-smollm2.yaml"
PREFIX = re.compile(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens")
READ = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
WRITE = re.compile(r"^\S+\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
TOTAL = re.compile(r"total time =\s*([\d.]+) ms")


def server_timings(log: Path) -> list[dict]:
    """One entry per request the server answered, in order: tokens kept from the previous prompt, tokens read
    and their milliseconds, tokens written and their milliseconds, and the request's whole time in the server
    (``total_ms``: reading, writing, and what llama.cpp times apart, sampling above all)."""
    requests, current = [], {"kept": 0}
    for line in log.read_text(errors="replace").splitlines():
        if match := PREFIX.search(line):
            current["kept"] = int(match[1])
        elif match := READ.search(line):
            current.update(read_ms=float(match[1]), read=int(match[2]))
        elif match := WRITE.search(line.strip()):
            current.update(write_ms=float(match[1]), written=int(match[2]))
            requests.append(current)
            current = {"kept": 0}
        elif (match := TOTAL.search(line)) and requests:
            requests[-1]["total_ms"] = float(match[1])
    return requests


def answer_formats(cache: Path) -> list[str]:
    """``json`` or ``prose`` for each answer of the cache, in the order they were stored."""
    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT value FROM answers ORDER BY rowid").fetchall()
    return ["json" if json.loads(value)["content"].lstrip()[:1] in "{[" else "prose" for (value,) in rows]


def totals(requests: list[dict]) -> dict:
    read_s = sum(r.get("read_ms", 0.0) for r in requests) / 1000
    total_s = sum(r.get("total_ms", 0.0) for r in requests) / 1000
    write_s = sum(r.get("write_ms", 0.0) for r in requests) / 1000
    read = sum(r.get("read", 0) for r in requests)
    written = sum(r.get("written", 0) for r in requests)
    return {
        "requests": len(requests),
        "prompt_tokens_kept": sum(r["kept"] for r in requests),
        "prompt_tokens_read": read,
        "read_s": round(read_s, 1),
        "read_tokens_per_s": round(read / read_s, 1) if read_s else None,
        "tokens_written": written,
        "write_s": round(write_s, 1),
        "write_tokens_per_s": round(written / write_s, 1) if write_s else None,
        "server_s": round(total_s, 1),
        "sampling_and_rest_s": round(total_s - read_s - write_s, 1),
        "sampling_ms_per_token": round(1000 * (total_s - read_s - write_s) / written, 2) if written else None,
    }


@contextmanager
def verbose_server(work: Path, threads: int) -> Iterator[tuple[LocalLLMServer, Path, float]]:
    """The main job's llama.cpp server (``LocalLLMServer``'s command) with llama-cpp-python's per-request
    timings on, logging to ``work/server.log``; yields the server, the log and the seconds it took to answer."""
    server = LocalLLMServer(threads=threads, backend="llama.cpp")
    command = server.command()
    command[command.index("--verbose") + 1] = "True"
    log = work / "server.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{server.base_url}/models", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.perf_counter() - started > 180:
                    raise SystemExit(f"the server did not start; its log: {log}") from None
                time.sleep(0.25)
        yield server, log, round(time.perf_counter() - started, 1)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    from st_synth.generation.config import GenerationConfig
    from st_synth.generation.stage import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=None, help="Default: the config's.")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--results", default=str(RESULTS / "generation-time"))
    args = parser.parse_args()
    section = yaml.safe_load(Path(args.config).read_text())["generate"]
    threads = section.pop("llm_threads", 1)
    if args.num_examples:
        section["num_examples"] = args.num_examples
    work = Path(tempfile.mkdtemp(prefix="bench-generation-time-"))
    with verbose_server(work, threads) as (server, log, server_start):
        os.environ.setdefault("OPENAI_API_KEY", "local")
        config = GenerationConfig(**{**section, "local": False, "base_url": server.base_url, "model": server.alias,
                                     "cache": str(work / "answers.sqlite"), "show_progress": False})  # fmt: skip
        began = time.perf_counter()
        report = generate(config, work / "data").report
        wall = time.perf_counter() - began
    requests = server_timings(log)
    formats = answer_formats(work / "answers.sqlite")
    if len(formats) != len(requests):
        raise SystemExit(
            f"{len(requests)} timings in {log} against {len(formats)} answers: cannot label them"
        )
    by_format = {
        name: totals([r for r, f in zip(requests, formats, strict=True) if f == name])
        for name in ("json", "prose")
    }
    every = totals(requests)
    commit = current_commit()
    payload = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "llama_cpp_python": __import__("llama_cpp").__version__, "num_examples": section["num_examples"],
        "kept": report["num_examples_kept"], "server_start_s": server_start, "generation_wall_s": round(wall, 1),
        "all": every, "by_format": by_format,
        "outside_server_s": round(wall - every["server_s"], 1),
    }  # fmt: skip
    Path(f"{args.results}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Where the main job's generation time goes",
        "",
        f"`python benchmarks/bench_generation_time.py` ({payload['date']}, commit {commit}, {payload['machine']}, "
        f"llama-cpp-python {payload['llama_cpp_python']}): the main job's generate section, {payload['num_examples']} "
        f"examples ({payload['kept']} kept), its llama.cpp server alone on the machine, empty answer cache. "
        f"Server start {payload['server_start_s']} s; generation {payload['generation_wall_s']} s, of which the "
        f"server spent {every['server_s']} s on the requests (reading prompts {every['read_s']} s, writing answers "
        f"{every['write_s']} s, the rest, sampling above all, {every['sampling_and_rest_s']} s) and the client, "
        f"HTTP, the corpus and saving {payload['outside_server_s']} s.",
        "",
        "| answers | requests | prompt tokens kept from the previous request | read | read s | read tok/s "
        "| written | write s | write tok/s | sampling and rest s | per written token ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in [*by_format.items(), ("all", every)]:
        lines.append(
            f"| {name} | {entry['requests']} | {entry['prompt_tokens_kept']} | {entry['prompt_tokens_read']} | "
            f"{entry['read_s']} | {entry['read_tokens_per_s']} | {entry['tokens_written']} | {entry['write_s']} | "
            f"{entry['write_tokens_per_s']} | {entry['sampling_and_rest_s']} | {entry['sampling_ms_per_token']} |"
        )
    Path(f"{args.results}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
