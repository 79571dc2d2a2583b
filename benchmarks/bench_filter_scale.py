"""The consistency filter at scale: wall time and peak RSS of ``st-synth filter``'s function over N fake answers,
and of its grounded round trip against a corpus of M passages, with the packaged all-MiniLM-L6-v2 guide.

Each case runs ``filter_folder`` (the stage both ``st-synth filter`` and the run call) in a fresh child process,
so its peak RSS is its own. Free rows: N retrieval rows (a query of 8-12 made-up words, a positive of 40),
every positive distinct, so each query is ranked among N candidates. Grounded rows: N queries, each written
from one passage of an M-passage corpus, ranked among all M passages (Promptagator's round trip). The time is
split into encoding (the guide) and ranking (:func:`st_synth.data.guide.rank_of_own`, block by block).

With ``--guide hashed`` the guide is a stand-in that maps a text to a seeded random unit vector (384
dimensions, like MiniLM's) from its first eight words plus a smaller one from the whole text, so a query
(the first 8-12 words of its positive) lands near its positive: everything but the encoder's own cost is
measured (MiniLM encodes 40-50 short texts/s per core here: ``encode.md``), which makes 500k rows and a
1M-passage corpus affordable on 2 cores.

    python benchmarks/bench_filter_scale.py --free 100000,500000 --grounded 100000:1000000 --guide hashed

Results go to ``benchmarks/results/filter-scale.json`` (one entry per case, replaced when run again) and
``filter-scale.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import current_commit

RESULTS = Path(__file__).parent / "results"
WORDS = [f"w{n:04d}" for n in range(20000)]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class HashedGuide:
    """The ``--guide hashed`` stand-in (see the module docstring)."""

    dimensions = 384

    def _vector(self, text: str):
        import hashlib

        import numpy as np

        def seeded(part: str):
            seed = int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
            return np.random.default_rng(seed).standard_normal(self.dimensions, dtype=np.float32)

        vector = seeded(" ".join(text.split()[:8])) + 0.6 * seeded(text)
        return vector / np.linalg.norm(vector)

    def encode(self, texts, **kwargs):
        import numpy as np

        return (
            np.stack([self._vector(t) for t in texts])
            if texts
            else np.zeros((0, self.dimensions), np.float32)
        )

    encode_document = encode


def whole_matrix(queries, candidates, own, limit):
    """The rule before blocks (``--ranking whole``): every score at once, for the baseline figures."""
    import numpy as np

    scores = queries @ candidates.T
    mine = scores[np.arange(len(queries)), own]
    return mine, np.minimum((scores > mine[:, None]).sum(axis=1), limit)


def child(case: str, rows: int, passages: int, workdir: str, guide: str, ranking: str) -> None:
    """Build the case's data in ``workdir``, filter it, print one JSON line with the figures."""
    from datasets import Dataset, DatasetDict

    import st_synth.data.filtering as filtering
    from st_synth.data.examples import InstructionFormat, save_examples
    from st_synth.data.filtering import ConsistencyFilter, filter_folder

    rng = random.Random(0)
    corpus = [_text(rng, 40) for _ in range(passages)] if case == "grounded" else None
    positives = [rng.choice(corpus) for _ in range(rows)] if corpus else [_text(rng, 40) for _ in range(rows)]
    queries = [" ".join(p.split()[: rng.randint(8, 12)]) for p in positives]
    data = DatasetDict({"retrieval": Dataset.from_dict({
        "instruction": ["Find the passage."] * rows, "query": queries, "positive": positives,
        "language": ["English"] * rows})})  # fmt: skip
    source = Path(workdir) / "generated"
    save_examples(data, source, InstructionFormat())
    del data, queries, positives
    timings = {"rank_s": 0.0}
    ranked = filtering.rank_of_own if ranking == "blocks" else whole_matrix

    def timed_rank(*args, **kwargs):
        started = time.perf_counter()
        result = ranked(*args, **kwargs)
        timings["rank_s"] += time.perf_counter() - started
        return result

    filtering.rank_of_own = timed_rank
    if guide == "hashed":
        ConsistencyFilter.load_guide = lambda self: HashedGuide()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = filter_folder(source, Path(workdir) / "filtered", ConsistencyFilter(), passages=corpus)
    wall = time.perf_counter() - started
    print(json.dumps({
        "case": case, "rows": rows, "passages": passages, "wall_s": round(wall, 1),
        "rank_s": round(timings["rank_s"], 1), "encode_and_io_s": round(wall - timings["rank_s"], 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_before_filter_gib": round(rss_before / 2**20, 2), "kept": report["kept"], "guide": guide,
        "ranking": ranking,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free", default="100000,500000", help="Row counts of free (not grounded) cases.")
    parser.add_argument("--grounded", default="100000:1000000", help="ROWS:PASSAGES of grounded cases.")
    parser.add_argument(
        "--guide",
        choices=["minilm", "hashed"],
        default="minilm",
        help="minilm: the packaged all-MiniLM-L6-v2; hashed: the stand-in (module docstring).",
    )
    parser.add_argument(
        "--ranking",
        choices=["blocks", "whole"],
        default="blocks",
        help="blocks: st-synth's; whole: every score at once (the rule before, as a baseline).",
    )
    parser.add_argument("--child", nargs=3, metavar=("CASE", "ROWS", "PASSAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as workdir:
            child(args.child[0], int(args.child[1]), int(args.child[2]), workdir, args.guide, args.ranking)
        return
    cases = [("free", int(n), 0) for n in args.free.split(",") if n]
    cases += [
        ("grounded", int(r), int(p)) for r, _, p in (c.partition(":") for c in args.grounded.split(",") if c)
    ]
    path = RESULTS / "filter-scale.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    commit = current_commit()
    for case, rows, passages in cases:
        done = subprocess.run([sys.executable, __file__, "--child", case, str(rows), str(passages), "--guide",
                               args.guide, "--ranking", args.ranking], capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{case} {rows}: failed\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result |= {"date": time.strftime("%Y-%m-%d"), "commit": commit}
        print(json.dumps(result))
        key = (args.ranking, args.guide, case, rows, passages)
        entries = [
            e for e in entries if (e["ranking"], e["guide"], e["case"], e["rows"], e["passages"]) != key
        ]
        entries.append(result)
    entries.sort(key=lambda e: (e["ranking"], e["guide"], e["case"], e["rows"], e["passages"]))
    path.write_text(json.dumps(entries, indent=2) + "\n")
    lines = ["# The consistency filter at scale", "",
             "`python benchmarks/bench_filter_scale.py` (see its docstring), 2 cores. guide: all-MiniLM-L6-v2 "
             "(minilm) or the hashed stand-in that leaves the encoder's cost out (hashed); ranking: st-synth's blocks, "
             "or every score at once (whole: the rule before, the baseline).", "",
             "| ranking | guide | case | rows | passages | wall s | encode + I/O s | rank s | peak RSS GiB | kept | date | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in entries:
        lines.append(f"| {e['ranking']} | {e['guide']} | {e['case']} | {e['rows']:,} | {e['passages']:,} | {e['wall_s']} | {e['encode_and_io_s']} | "
                     f"{e['rank_s']} | {e['peak_rss_gib']} | {e['kept']:,} | {e['date']} | {e['commit']} |")  # fmt: skip
    (RESULTS / "filter-scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
