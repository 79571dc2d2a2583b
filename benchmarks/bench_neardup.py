"""Cost of the near-duplicate index per example: one ``find`` then one ``add`` (what the builder does for each
settled example), at growing index sizes, and the memory the index holds per entry.

Texts: 12 made-up words each (like the fake server's answers), one in ten a repeat of an earlier text with a
word changed. Each figure is the mean over the last 10,000 examples before the size is reached, after
``signature`` (timed apart: the same in every version).

    python benchmarks/bench_neardup.py --label sorted-arrays

Run it with ``PYTHONPATH`` set to another checkout to measure that checkout's index under the same label
scheme; results are added to ``benchmarks/results/neardup.json`` (one entry per label) and ``neardup.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WORDS = [f"w{n:04d}" for n in range(5000)]
WINDOW = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--sizes", default="20000,80000")
    args = parser.parse_args()
    import st_synth.data.neardup as neardup

    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = random.Random(0)
    texts: list[str] = []
    for n in range(sizes[-1]):
        if n > 10 and rng.random() < 0.1:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(12)))
    started = time.perf_counter()
    signatures = [neardup.signature((t,)) for t in texts]
    signature_us = 1e6 * (time.perf_counter() - started) / len(texts)
    index = neardup.NearDuplicateIndex(0.8)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows, found, window_start = [], 0, 0.0
    for n, sig in enumerate(signatures):
        if n == sizes[0] - WINDOW or (rows and n == sizes[len(rows)] - WINDOW):
            window_start = time.perf_counter()
        if index.find(sig) is not None:
            found += 1
        else:
            index.add(sig, n)
        if n + 1 == sizes[len(rows)]:
            rows.append({"size": n + 1, "find_add_us": round(1e6 * (time.perf_counter() - window_start) / WINDOW, 1),
                         "near_duplicates_found": found})  # fmt: skip
            if len(rows) == len(sizes):
                break
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024 / len(index)
    entry = {"label": args.label, "module": neardup.__file__, "signature_us": round(signature_us, 1),
             "rows": rows, "peak_rss_growth_bytes_per_entry": round(rss_growth)}  # fmt: skip
    print(json.dumps(entry))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "neardup.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| index | " + " | ".join(f"find + add at {r['size']:,} (us)" for r in rows)
             + " | near-duplicates found | peak RSS growth per entry (bytes) |",
             "|---|" + "---|" * (len(rows) + 2)]  # fmt: skip
    for label, e in results.items():
        lines.append(f"| {label} | " + " | ".join(str(r["find_add_us"]) for r in e["rows"])
                     + f" | {e['rows'][-1]['near_duplicates_found']:,} | {e['peak_rss_growth_bytes_per_entry']:,} |")  # fmt: skip
    (RESULTS / "neardup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
