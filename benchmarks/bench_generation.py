"""Generation throughput: st-synth vs distilabel 1.5.3 on the same loopback endpoint.

A fake OpenAI-compatible server (``python -m st_synth.testing``) runs in its own process with
log-normal latency (mean 200 ms, sigma 1: most answers fast, a few very slow). For each concurrency, both
tools generate retrieval examples; we report kept examples per second, requests per second against the
bound ``concurrency / mean latency``, and client CPU milliseconds per kept example.

    python benchmarks/bench_generation.py --distilabel-python /path/to/distilabel-venv/bin/python

Results go to ``benchmarks/results/generation.json`` and ``.md`` (``--results-name``). Without
``--distilabel-python`` distilabel is not measured. The README's figures come from:

    python benchmarks/bench_generation.py --seconds 25 --distilabel-python ...
    python benchmarks/bench_generation.py --concurrency 64 --num-examples 8000 --seeds 0,1,2,3 --results-name generation-c64-seeds
    python benchmarks/bench_generation.py --concurrency 64 --num-examples 64000 --seeds 0,1,2 --results-name generation-c64-sustained

Short runs measure the drain as much as the client: with this heavy tail the last answers take seconds
whatever the client, a large share of a run of a few seconds; the steady-state column does not pay it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from st_synth.testing.openai_server import get_json, start_server_process

RESULTS = Path(__file__).parent / "results"
MEAN_LATENCY = 0.2


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def measured(base_url: str, seed: int, run, *args) -> dict:
    """``run(base_url, *args)`` with the server drawing latencies from ``seed`` (the clients of one row meet
    the same draws in the order their requests arrive), plus what the server saw meanwhile: requests in
    flight on average over the run's wall time, the mean time a request spent in the server against the
    latency drawn for it, the steady-state rate (requests answered per second between the first 2 and the
    last 3 seconds of the run) and the drain: seconds from the last request's arrival at the server to the
    run's end, where only the heavy tail's slowest answers are left."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((time.perf_counter(), get_json(base_url, "timing")["handled"]))

    get_json(base_url, f"reseed/{seed}")
    before, started = get_json(base_url, "timing"), time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = run(base_url, *args)
    ended, ended_monotonic = time.perf_counter(), time.monotonic()
    done.set()
    sampler.join()
    after = get_json(base_url, "timing")
    delta = {key: after[key] - before[key] for key in after if key != "last_arrival"}
    handled = max(1, delta["handled"])
    steady = [(t, n) for t, n in samples if started + 2 <= t <= ended - 3]
    return {
        **result,
        "server_mean_inflight": delta["inflight_seconds"] / result["wall_s"],
        "server_latency_ms": 1000 * delta["handler_seconds"] / handled,
        "drawn_latency_ms": 1000 * delta["drawn_seconds"] / handled,
        "drain_s": ended_monotonic - after["last_arrival"],
        "steady_requests_per_s": (
            (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) >= 5 else None
        ),
    }


def run_st_synth(base_url: str, concurrency: int, num_examples: int) -> dict:
    from st_synth import GenerationConfig, SyntheticDatasetBuilder

    with tempfile.TemporaryDirectory() as tmp:
        config = GenerationConfig(
            model="fake-llm", base_url=base_url, num_examples=num_examples, kinds="retrieval",
            languages="English", concurrency=concurrency, cache=f"{tmp}/cache.sqlite", show_progress=False,
        )  # fmt: skip
        builder = SyntheticDatasetBuilder(config)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        dataset = builder.build()
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {
        "kept": dataset["retrieval"].num_rows,
        "requests": builder.report["requests_sent"],
        "wall_s": wall,
        "cpu_s": cpu,
    }


def run_reference(base_url: str, concurrency: int, num_requests: int) -> dict:
    """The ceiling a client can reach here: a bare aiohttp loop keeping ``concurrency`` requests in flight,
    reading each answer and nothing else (no prompts, validation, cache or retries). It pays the same ramp,
    heavy-tail drain and shared cores as the clients measured, so ``st-synth / reference`` is the share of
    the reachable rate that st-synth gets."""
    import asyncio

    import aiohttp

    message = (
        'Answer with a JSON object with keys "user_query", "positive_document", "hard_negative_document".'
    )

    async def send_all() -> None:
        left = num_requests
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    body = {
                        "model": "fake-llm",
                        "messages": [{"role": "user", "content": message}],
                        "seed": left,
                    }
                    async with session.post(f"{base_url}/chat/completions", json=body) as response:
                        json.loads(await response.read())

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    asyncio.run(send_all())
    return {"kept": num_requests, "requests": num_requests,
            "wall_s": time.perf_counter() - wall0, "cpu_s": cpu_seconds() - cpu0}  # fmt: skip


def run_distilabel(python: str, base_url: str, concurrency: int, num_examples: int) -> dict:
    worker = Path(__file__).parent / "distilabel_e5_worker.py"
    command = [python, str(worker), "--base-url", base_url, "--model", "fake-llm",
               "--concurrency", str(concurrency), "--num-examples", str(num_examples)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(result: dict, concurrency: int) -> dict:
    bound = concurrency / MEAN_LATENCY
    return {
        **result,
        "kept_per_s": result["kept"] / result["wall_s"],
        "requests_per_s": result["requests"] / result["wall_s"],
        "share_of_bound": result["requests"] / result["wall_s"] / bound,
        "steady_share_of_bound": result["steady_requests_per_s"] / bound
        if result["steady_requests_per_s"]
        else None,
        "cpu_ms_per_kept": 1000 * result["cpu_s"] / max(1, result["kept"]),
    }


def _steady(result: dict) -> str:
    rate = result["steady_requests_per_s"]
    return f"{rate:.1f} ({result['steady_share_of_bound']:.1%})" if rate else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distilabel-python", default=None)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="Target duration of each measurement.")
    parser.add_argument(
        "--num-examples", type=int, default=None, help="Examples per measurement (overrides --seconds)."
    )
    parser.add_argument(
        "--seeds", default="0", help="Latency seeds: one row per concurrency and seed, e.g. 0,1,2."
    )
    parser.add_argument("--results-name", default="generation", help="benchmarks/results/NAME.json and .md")
    args = parser.parse_args()
    process, base_url = start_server_process(MEAN_LATENCY)
    rows = []
    try:
        cases = [(int(c), int(seed)) for c in args.concurrency.split(",") for seed in args.seeds.split(",")]
        for concurrency, seed in cases:
            num_examples = args.num_examples or max(10, int(args.seconds * concurrency / MEAN_LATENCY))
            ours = summarise(measured(base_url, seed, run_st_synth, concurrency, num_examples), concurrency)
            reference = summarise(
                measured(base_url, seed, run_reference, concurrency, ours["requests"]), concurrency
            )
            row = {
                "concurrency": concurrency,
                "latency_seed": seed,
                "num_examples": num_examples,
                "bound_requests_per_s": concurrency / MEAN_LATENCY,
                "st_synth": ours,
                "reference": reference,
                "share_of_reference": ours["requests_per_s"] / reference["requests_per_s"],
            }
            if args.distilabel_python:
                theirs = summarise(
                    measured(
                        base_url,
                        seed,
                        partial(run_distilabel, args.distilabel_python),
                        concurrency,
                        num_examples,
                    ),
                    concurrency,
                )
                row["distilabel"] = theirs
                row["kept_per_s_ratio"] = ours["kept_per_s"] / theirs["kept_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        process.terminate()
    RESULTS.mkdir(exist_ok=True)
    payload = {"mean_latency_s": MEAN_LATENCY, "latency": "log-normal, sigma 1", "rows": rows}
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = ["concurrency", "latency seed", "examples", "bound req/s", "st-synth req/s (share of bound)",
              "st-synth steady-state req/s (share)", "reference client req/s (share)",
              "reference steady-state req/s (share)", "st-synth / reference", "drain s (st-synth / reference)",
              "st-synth kept/s",
              "st-synth CPU ms/kept", "in flight at the server (st-synth)",
              "ms in the server per request (drawn)", "distilabel kept/s", "distilabel CPU ms/kept",
              "kept/s ratio"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ours, ref, theirs = row["st_synth"], row["reference"], row.get("distilabel")
        cells = [
            row["concurrency"], row["latency_seed"], row["num_examples"], f"{row['bound_requests_per_s']:.0f}",
            f"{ours['requests_per_s']:.1f} ({ours['share_of_bound']:.1%})", _steady(ours),
            f"{ref['requests_per_s']:.1f} ({ref['share_of_bound']:.1%})", _steady(ref),
            f"{row['share_of_reference']:.1%}", f"{ours['drain_s']:.1f} / {ref['drain_s']:.1f}",
            f"{ours['kept_per_s']:.1f}", f"{ours['cpu_ms_per_kept']:.2f}",
            f"{ours['server_mean_inflight']:.1f}",
            f"{ours['server_latency_ms']:.0f} ({ours['drawn_latency_ms']:.0f})",
            *((f"{theirs['kept_per_s']:.1f}", f"{theirs['cpu_ms_per_kept']:.2f}", f"{row['kept_per_s_ratio']:.2f}x")
              if theirs else ("-", "-", "-")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    (RESULTS / f"{args.results_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
