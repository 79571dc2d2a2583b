"""Generation at paper scale on one machine: wall time, throughput, client CPU, peak RSS, cache and dataset size.

A fake OpenAI-compatible server (``python -m st_synth.testing --asyncio``) runs in its own process with
log-normal latency (mean 5 ms, sigma 1); each size N runs ``SyntheticDatasetBuilder`` in a fresh child
process with a fresh answer cache (so the child's peak RSS is the run's own), concurrency 64, the paper's six
kinds, then saves the dataset. With ``--kill-at F`` the largest N is also run a second time, SIGKILLed once the
cache holds F x N answers, and started again: the dataset it saves must be the uninterrupted run's
(``--kill-size`` picks another of the sizes for that).

    python benchmarks/bench_scale.py --sizes 64000,100000,250000,500000 --kill-at 0.6 --kill-size 100000

Results go to ``benchmarks/results/scale.json`` and ``scale.md``. The bound is concurrency / mean latency
(12,800 requests/s here), far above what one Python client reaches on a 2-core machine shared with the
server: the figure to compare across N is each run's share of it (the issue's target: the largest run
within 5% of the 64k run's share).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from st_synth.testing.openai_server import start_server_process

RESULTS = Path(__file__).parent / "results"
MEAN_LATENCY = 0.005
CONCURRENCY = 64
KINDS = "retrieval,classification,short_short,long_long,sts,bitext"


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(base_url: str, num_examples: int, workdir: Path) -> dict:
    """One generation in this process; prints its measurements as JSON."""
    from datasets import load_from_disk

    from st_synth import GenerationConfig, SyntheticDatasetBuilder

    samples: list[tuple[float, float]] = []
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((round(time.perf_counter() - started, 1), round(_rss_mib(), 1)))

    threading.Thread(target=sample, daemon=True).start()
    config = GenerationConfig(model="fake-llm", base_url=base_url, cache=str(workdir / "cache.sqlite"), seed=0,
                              num_examples=num_examples, kinds=KINDS, concurrency=CONCURRENCY,
                              show_progress=False)  # fmt: skip
    builder = SyntheticDatasetBuilder(config)
    builder.build()
    built = time.perf_counter()
    rss_built = _rss_mib()
    builder.save(workdir / "data")
    saved = time.perf_counter()
    done.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = builder.report
    digest = hashlib.sha256()
    dataset = load_from_disk(str(workdir / "data"))
    for kind in sorted(dataset):
        for batch in dataset[kind].iter(batch_size=4096):
            digest.update(json.dumps(batch, sort_keys=True).encode())
    cache_bytes = sum(p.stat().st_size for p in workdir.glob("cache.sqlite*"))
    data_bytes = sum(p.stat().st_size for p in (workdir / "data").rglob("*") if p.is_file())
    return {
        "num_examples": num_examples,
        "kept": report["num_examples_kept"],
        "complete": report["complete"],
        "requests_sent": report["requests_sent"],
        "cache_hits": report["cache_hits"],
        "drops": report["drops"],
        "build_s": round(built - started, 2),
        "save_s": round(saved - built, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "rss_after_build_mib": round(rss_built, 1),
        "rss_samples": samples[:: max(1, len(samples) // 40)],
        "cache_mib": round(cache_bytes / 2**20, 1),
        "dataset_mib": round(data_bytes / 2**20, 1),
        "dataset_sha256": digest.hexdigest(),
    }


def run_child(base_url: str, num_examples: int, workdir: Path, kill_after: int | None = None) -> dict | None:
    command = [sys.executable, __file__, "--child", base_url, str(num_examples), str(workdir)]
    if kill_after is None:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    from st_synth.generation.cache import AnswerCache

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while AnswerCache.count(workdir / "cache.sqlite") < kill_after and process.poll() is None:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run ended before it was killed ({process.returncode})")
    return None


def summarise(result: dict) -> dict:
    bound = CONCURRENCY / MEAN_LATENCY
    requests_per_s = result["requests_sent"] / result["build_s"]
    return {
        **result,
        "requests_per_s": round(requests_per_s, 1),
        "share_of_bound": round(requests_per_s / bound, 5),
        "kept_per_s": round(result["kept"] / result["build_s"], 1),
        "cpu_ms_per_kept": round(1000 * result["cpu_s"] / result["kept"], 3),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64000,100000,250000,500000")
    parser.add_argument(
        "--kill-at", type=float, default=None, help="Also kill and resume a run at this share."
    )
    parser.add_argument("--kill-size", type=int, default=None, help="The size killed (default: the largest).")
    parser.add_argument("--results-name", default="scale")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    server, base_url = start_server_process(MEAN_LATENCY)
    rows: list[dict] = []
    try:
        for size in sizes:
            with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
                result = summarise(run_child(base_url, size, Path(tmp)))
            rows.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}), flush=True)
        resume = None
        if args.kill_at:
            size = args.kill_size or sizes[-1]
            if size not in sizes:
                raise SystemExit(f"--kill-size {size} is not one of --sizes {args.sizes}")
            reference = next(r for r in rows if r["num_examples"] == size)
            with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
                run_child(base_url, size, Path(tmp), kill_after=int(args.kill_at * size))
                resumed = summarise(run_child(base_url, size, Path(tmp)))
            resume = {"num_examples": size, "killed_after_answers": int(args.kill_at * size),
                      "same_dataset": resumed["dataset_sha256"] == reference["dataset_sha256"], **resumed}  # fmt: skip
            print(json.dumps({k: v for k, v in resume.items() if k != "rss_samples"}), flush=True)
    finally:
        server.terminate()
    RESULTS.mkdir(exist_ok=True)
    payload = {"mean_latency_s": MEAN_LATENCY, "concurrency": CONCURRENCY, "kinds": KINDS, "cpus": os.cpu_count(),
               "runs": rows, "kill_and_resume": resume}  # fmt: skip
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    base = rows[0]
    lines = [
        f"Loopback fake server, log-normal latency mean {MEAN_LATENCY * 1000:g} ms, concurrency {CONCURRENCY}, "
        f"{os.cpu_count()} cores shared by client and server; bound {CONCURRENCY / MEAN_LATENCY:,.0f} req/s.",
        "",
        "| examples | wall s (build + save) | requests/s | share of bound (vs first row) | kept/s | client CPU ms/kept "
        "| peak RSS MiB | answer cache MiB | dataset MiB | save s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_examples']:,} | {r['build_s'] + r['save_s']:.1f} | {r['requests_per_s']:,.1f} | "
            f"{r['share_of_bound']:.2%} ({r['share_of_bound'] / base['share_of_bound']:.1%}) | {r['kept_per_s']:,.1f} | "
            f"{r['cpu_ms_per_kept']:.2f} | {r['peak_rss_mib']:,.0f} | {r['cache_mib']:,.0f} | {r['dataset_mib']:,.1f} | "
            f"{r['save_s']:.1f} |"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        examples = last["num_examples"] - first["num_examples"]
        lines += ["", f"From {first['num_examples']:,} to {last['num_examples']:,} examples peak RSS grows "
                  f"{(last['peak_rss_mib'] - first['peak_rss_mib']) * 2**20 / examples:,.0f} bytes per example "
                  f"(after the build, before saving: {(last['rss_after_build_mib'] - first['rss_after_build_mib']) * 2**20 / examples:,.0f}); "
                  f"the saved dataset {(last['dataset_mib'] - first['dataset_mib']) * 2**20 / examples:,.0f} bytes per example."]  # fmt: skip
    if resume:
        lines += ["", f"SIGKILL at {resume['killed_after_answers']:,} answers of a {resume['num_examples']:,} run, "
                  f"then the same command: {resume['requests_sent']:,} requests sent by the restart, "
                  f"{resume['cache_hits']:,} cache hits, same dataset as the uninterrupted run: "
                  f"{resume['same_dataset']}."]  # fmt: skip
    (RESULTS / f"{args.results_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
