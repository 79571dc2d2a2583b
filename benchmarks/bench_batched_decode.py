"""What answering several requests at once could save the main job: llama.cpp's tokens/s when it decodes B
sequences in one step, against one sequence at a time (what llama-cpp-python's server does).

llama-cpp-python's OpenAI server answers one request at a time; llama.cpp itself can decode several sequences
in one ``llama_decode`` (its own C++ server's parallel slots). Before building a server that does, this
measures the ceiling on the packaged SmolLM2-135M-Instruct: for each B, B sequences each read a prompt of
``--prompt`` tokens (one sequence at a time, as the server reads them), then write ``--steps`` tokens
together, one token per sequence per ``llama_decode``, greedy (the sampler's cost is left out). Token ids are
seeded random ones: the cost of a step does not depend on them. Each B gets a fresh context; the rounds go
through every B ``--rounds`` times and the best round per B is kept (the machine's drift).

    python benchmarks/bench_batched_decode.py                   # B = 1, 2, 4, 8, 16
    python benchmarks/bench_batched_decode.py --batches 1,4 --threads 2

Results: ``benchmarks/results/batched-decode.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from _results import current_commit

RESULTS = Path(__file__).parent / "results"


def measure(model, batch_size: int, prompt: int, steps: int, threads: int, seed: int = 0) -> dict[str, float]:
    """Tokens/s reading B prompts one after another, and writing ``steps`` tokens for B sequences together."""
    import llama_cpp as lib

    params = lib.llama_context_default_params()
    capacity = max(
        512, prompt, batch_size
    )  # tokens one llama_decode takes: a whole prompt, or one per sequence
    params.n_ctx = batch_size * (prompt + steps + 8)
    params.n_batch = params.n_ubatch = capacity
    params.n_seq_max = batch_size
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    context = lib.llama_init_from_model(model, params)
    batch = lib.llama_batch_init(capacity, 0, batch_size)
    vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    rng = np.random.default_rng(seed)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, position, sequence, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        if lib.llama_decode(context, batch) != 0:
            raise RuntimeError(f"llama_decode failed at B={batch_size}")

    try:
        began = time.perf_counter()
        for sequence in range(batch_size):
            decode(
                [(int(rng.integers(100, vocab_size)), p, sequence, p == prompt - 1) for p in range(prompt)]
            )
        read_s = time.perf_counter() - began
        tokens = [int(rng.integers(100, vocab_size)) for _ in range(batch_size)]
        began = time.perf_counter()
        for step in range(steps):
            decode([(tokens[s], prompt + step, s, True) for s in range(batch_size)])
            for s in range(batch_size):
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(context, s), shape=(vocab_size,))
                tokens[s] = int(logits.argmax())
        write_s = time.perf_counter() - began
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(context)
    return {
        "read_tok_s": round(batch_size * prompt / read_s, 1),
        "write_tok_s": round(batch_size * steps / write_s, 1),
    }


def main() -> None:
    import llama_cpp as lib

    from st_synth.model.backbones import packaged_smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", default="1,2,4,8,16", help="Sequences decoded together, comma-separated."
    )
    parser.add_argument("--prompt", type=int, default=100, help="Prompt tokens per sequence.")
    parser.add_argument("--steps", type=int, default=64, help="Tokens written per sequence.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS / "batched-decode"))
    args = parser.parse_args()
    try:
        sizes = [int(size) for size in args.batches.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batches takes positive integers, got {args.batches!r}")
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(
        str(packaged_smollm2_gguf()).encode(), lib.llama_model_default_params()
    )
    best: dict[int, dict[str, float]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            result = measure(model, size, args.prompt, args.steps, args.threads)
            if size not in best or result["write_tok_s"] > best[size]["write_tok_s"]:
                best[size] = result
            print(size, result, flush=True)
    lib.llama_model_free(model)
    single = best.get(1, {}).get("write_tok_s")
    payload = {
        "date": time.strftime("%Y-%m-%d"), "commit": current_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
        "llama_cpp_python": lib.__version__, "prompt_tokens": args.prompt, "steps": args.steps,
        "rounds": args.rounds, "best": {str(size): entry for size, entry in best.items()},
    }  # fmt: skip
    Path(f"{args.results}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Several sequences decoded at once",
        "",
        f"`python benchmarks/bench_batched_decode.py` ({payload['date']}, commit {payload['commit']}, "
        f"{payload['machine']}, {args.threads} threads, llama-cpp-python {payload['llama_cpp_python']}): the "
        f"packaged SmolLM2-135M-Instruct (Q4_1), B sequences each reading {args.prompt} prompt tokens, then "
        f"writing {args.steps} tokens together (one llama_decode per step, greedy, no sampler); best of "
        f"{args.rounds} rounds per B.",
        "",
        "| sequences at once | read tok/s | write tok/s | write vs one at a time |",
        "|---|---|---|---|",
    ]
    for size in sorted(best):
        entry = best[size]
        ratio = f"{entry['write_tok_s'] / single:.2f}x" if single else ""
        lines.append(f"| {size} | {entry['read_tok_s']} | {entry['write_tok_s']} | {ratio} |")
    Path(f"{args.results}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
