"""The local llama.cpp server with and without its prompt cache (`llm_prompt_cache_mb`), same requests.

Each workload is generated twice from an empty answer cache, one request at a time (as the main job does),
by the packaged SmolLM2-135M on `--threads` cores: once with the prompt cache off (llama-cpp-python then
reuses only the previous request's beginning) and once on. Reported per run: wall time, seconds per request,
prompt and completion tokens, the server's peak resident memory (sampled every 0.2 s) and the SHA-256 of the
dataset, so that the two runs' answers can be compared, not only their speed.

    python benchmarks/bench_prompt_cache.py --examples 40

Workloads: `grounded` (the grounded config's kinds over gensim's Lee background news: a passage, two
demonstrations and a fixed rule per kind, about 440 prompt tokens) and `free` (the main job's free
generation: brainstorm and example templates, about 200 prompt tokens).
Writes benchmarks/results/prompt-cache.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil

from st_synth import GenerationConfig
from st_synth.builder import served_builder

RESULTS = Path(__file__).parent / "results"
WORKLOADS = {
    "grounded": {"corpus": ["builtin:lee-background"], "passage_tokens": 128, "min_tokens": 32,
                 "kinds": {"retrieval": 1, "long_long": 1, "sts": 2}},
    "free": {"kinds": {"retrieval": 2, "classification": 1, "short_short": 1, "long_long": 1, "sts": 2},
             "prompts_version": "v1"},
}  # fmt: skip


def dataset_sha(dataset) -> str:
    digest = hashlib.sha256()
    for name in sorted(dataset):
        for row in dataset[name]:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def run(workload: str, cache_mb: int, examples: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config = GenerationConfig(
            local=True, llm_threads=threads, llm_prompt_cache_mb=cache_mb, num_examples=examples,
            languages="English", concurrency=1, seed=42, cache=str(Path(folder) / "answers.sqlite"),
            show_progress=False, **WORKLOADS[workload],
        )  # fmt: skip
        with served_builder(config) as builder:
            server = psutil.Process(builder.server._process.pid)
            peak, done = [server.memory_info().rss], threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    try:
                        peak.append(server.memory_info().rss)
                    except psutil.Error:
                        return

            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            start = time.perf_counter()
            dataset = builder.build()
            wall = time.perf_counter() - start
            done.set()
            watcher.join()
        report = builder.report
    return {
        "workload": workload, "prompt_cache_mb": cache_mb, "wall_s": round(wall, 1),
        "requests": report["requests_sent"], "s_per_request": round(wall / max(1, report["requests_sent"]), 2),
        "prompt_tokens": report["prompt_tokens"], "completion_tokens": report["completion_tokens"],
        "kept": report["num_examples_kept"], "server_peak_rss_mib": round(max(peak) / 2**20),
        "dataset_sha256": dataset_sha(dataset),
    }  # fmt: skip


def render(payload: dict) -> str:
    lines = [
        f"{payload['machine']}, `python benchmarks/bench_prompt_cache.py --examples {payload['examples']} "
        f"--threads {payload['threads']}` at {payload['commit']}, {payload['date']}.",
        "",
        "| workload | prompt cache MiB | wall s | requests | s / request | prompt + completion tokens | kept "
        "| server peak RSS MiB | speed-up | same dataset as cache off |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["runs"]:
        off = next(
            r for r in payload["runs"] if r["workload"] == row["workload"] and not r["prompt_cache_mb"]
        )
        lines.append(
            f"| {row['workload']} | {row['prompt_cache_mb']} | {row['wall_s']} | {row['requests']} "
            f"| {row['s_per_request']} | {row['prompt_tokens']} + {row['completion_tokens']} | {row['kept']} "
            f"| {row['server_peak_rss_mib']} | {off['wall_s'] / row['wall_s']:.2f}x "
            f"| {'yes' if row['dataset_sha256'] == off['dataset_sha256'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=1024)
    parser.add_argument("--workloads", default="grounded,free")
    args = parser.parse_args()
    import subprocess

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    runs = []
    for workload in args.workloads.split(","):
        for cache_mb in (0, args.cache_mb):
            runs.append(run(workload, cache_mb, args.examples, args.threads))
            print(json.dumps(runs[-1]), flush=True)
    payload = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "commit": commit,
        "date": time.strftime("%Y-%m-%d"), "examples": args.examples, "threads": args.threads, "runs": runs,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt-cache.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "prompt-cache.md").write_text(render(payload))
    print(render(payload))


if __name__ == "__main__":
    main()
