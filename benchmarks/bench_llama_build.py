"""What the portable llama.cpp build costs: tokens/s of the packaged SmolLM2 served by several builds of
llama-cpp-python, taken in turns on one machine.

README's install builds llama-cpp-python with ``scripts/llama-cpp-cmake-args.sh`` (x86-64: no "native"
target, AVX2/FMA/F16C/BMI2; llama.cpp's native build crashes on CPUs with AMX). This compares it with the
native build on a machine where the native build works. Each variant is a folder that holds a
``llama_cpp`` package, put first on the server's PYTHONPATH (empty: the installed one). E.g.::

    pip wheel --no-deps --no-cache-dir -w /tmp/native llama-cpp-python==0.3.36
    pip install --no-deps --target /tmp/native/site /tmp/native/*.whl
    python benchmarks/bench_llama_build.py --variant native=/tmp/native/site --variant portable=

Other builds the same way, with other ``CMAKE_ARGS``: the portable flags plus ``-DCMAKE_C_FLAGS=-march=x86-64-v3
-DCMAKE_CXX_FLAGS=-march=x86-64-v3`` (the compiler may use AVX2 everywhere, not only in ggml's kernels), or
llama.cpp's every-CPU build ``-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON`` (one library
per CPU variant, the best-scoring one loaded at start: ``llama_backend_dl/sitecustomize.py`` loads it, since
llama-cpp-python does not).

Each round starts each variant's server (two threads), sends the same seeded requests one at a time
(200 completion tokens each, no stop) and times them; the rounds alternate the variants so that the
machine's drift falls on both. Results: ``benchmarks/results/llama-build.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path

from _results import current_commit

from st_synth.generation.local_llm import LocalLLMServer

RESULTS = Path(__file__).resolve().parent / "results"
# Put first on the server's PYTHONPATH for a GGML_BACKEND_DL build: loads its CPU variant at start-up.
DL_LOADER = Path(__file__).resolve().parent / "llama_backend_dl"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines train the immune system.",
    "Describe the water cycle to a child.",
    "List the causes of the French Revolution.",
]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(flag for flag in flags if flag.startswith(("avx", "amx", "fma", "f16c", "bmi")))


def backend_dl(folder: str) -> bool:
    """Whether the llama_cpp package in ``folder`` is a GGML_BACKEND_DL build (a library per CPU variant)."""
    return bool(folder) and any(
        any(place.glob("libggml-cpu-*.so"))
        for place in (Path(folder) / "llama_cpp" / "lib", Path(folder) / "bin")
    )


def measure(pythonpath: str, max_tokens: int, threads: int) -> dict[str, float]:
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(DL_LOADER), pythonpath] if backend_dl(pythonpath) else [pythonpath]
    )
    try:
        with LocalLLMServer(backend="llama.cpp", threads=threads) as server:
            tokens, seconds = 0, 0.0
            for seed, prompt in enumerate(PROMPTS):
                body = {"model": server.served_model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stop": []}  # fmt: skip
                request = urllib.request.Request(
                    f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )  # fmt: skip
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.loads(response.read())
                seconds += time.perf_counter() - started
                tokens += answer["usage"]["completion_tokens"]
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    return {
        "completion_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", action="append", metavar="NAME=PYTHONPATH")
    parser.add_argument(
        "--table-from", metavar="JSON", help="Redraw the table of a saved run; measure nothing."
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-name", default="llama-build")
    args = parser.parse_args()
    if args.table_from:
        write_table(json.loads(Path(args.table_from).read_text()), Path(args.table_from).with_suffix(".md"))
        return
    if not args.variant:
        parser.error("give --variant NAME=PYTHONPATH (two or more), or --table-from JSON")
    variants = dict(item.split("=", 1) for item in args.variant)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(measure(variants[name], args.max_tokens, args.threads))
            print(name, runs[name][-1], flush=True)
    summary = {
        name: {"median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in results), 2),
               "tokens_per_s": [r["tokens_per_s"] for r in results]}
        for name, results in runs.items()
    }  # fmt: skip
    commit = current_commit()
    payload = {"date": datetime.date.today().isoformat(), "commit": commit,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "flags": cpu_flags()},
               "settings": vars(args), "summary": summary, "runs": runs}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_table(payload, RESULTS / f"{args.results_name}.md")


def write_table(payload: dict, path: Path) -> None:
    """The markdown table of a run (``--table-from JSON`` redraws it from the saved figures)."""
    summary, settings = payload["summary"], payload["settings"]
    names = list(summary)
    best = {n: max(summary[n]["tokens_per_s"]) for n in names}
    median = {n: summary[n]["median_tokens_per_s"] for n in names}
    lines = [f"| build | tokens/s per round | median | best | median / {names[0]} | best / {names[0]} |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {', '.join(map(str, summary[n]['tokens_per_s']))} | {median[n]} | {best[n]} "
              f"| {median[n] / median[names[0]]:.3f} | {best[n] / best[names[0]]:.3f} |" for n in names]  # fmt: skip
    header = (f"`python benchmarks/bench_llama_build.py` ({payload['date']}, commit {payload['commit']}, "
              f"{payload['machine']['cores']} cores, CPU flags {' '.join(payload['machine']['flags'])}): "
              f"SmolLM2-135M-Instruct Q4_1, {settings['threads']} threads, {len(PROMPTS)} requests of "
              f"{settings['max_tokens']} tokens per round, {settings['rounds']} rounds in alternating order. "
              "Another process on the machine only slows a round, so the best round is the steadier figure "
              "where rounds spread.\n\n")  # fmt: skip
    path.write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
