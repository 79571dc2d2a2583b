"""Ablations of the main job: same synthetic data, same seed, one switch at a time.

    python benchmarks/bench_ablations.py --config recipes/configs/local-smollm2-grounded.yaml \
        --variants full,no_filter,no_mining,heuristic_added,free_generation
    python benchmarks/bench_ablations.py --variants full,mined_negatives --seeds 42,43,44

Variants (each a full `st-synth run` under OUTPUT/<variant>; generation answers come from the cache, so
variants that generate the same requests train on the same examples):

* full:              the config as it is (its output folder, so a finished main job is reused)
* no_filter:         every validated example, unfiltered
* no_mining:         no mined negatives: grounded retrieval, title and summary pairs train on in-batch
                     negatives only (sts keeps its LLM-written near-misses)
* free_generation:   the paper's free generation instead (no corpus; the LLM writes both sides and the
                     negatives of retrieval, classification and sts), with the earlier main job's mix of
                     kinds and number of examples
* heuristic_added:   the grounded data plus the two heuristic pairs sources of earlier main jobs
                     (builtin:lee-background-pairs halves, builtin:wikipedia-section-pairs; 160 pairs each)
* no_instructions / with_instructions: queries without / with their task instruction, in training and in
                     evaluation (the default list holds whichever of the two differs from the config)
* no_hard_negatives: in-batch negatives only (neither mined nor LLM-written negatives)
* mined_negatives:   the mine stage on, replacing LLM-written negatives: over the corpus for grounded data,
                     else among the data's own positives (every pair then gets one)
* retellings_only:   no free generation: every example a retelling of a news passage, as many as the main job
                     plans (260 of its 360; for local-smollm2.yaml)
* retellings:        the heuristic pairs sources swapped for SmolLM2's retellings of the same real texts
                     (benchmarks/bench_prose_pairs.py --variants retelling writes them; --prose_pairs is
                     where): with the free generation, every training pair then has an LLM-written side.
                     Not in the default list (it needs those files); for local-smollm2-heuristic.yaml
                     (local-smollm2.yaml generates its own retellings)

``--seeds``: train every variant once per training seed (``train.seed``; the data stays the same) and report
per task the mean over seeds, with the lowest and highest mean of a single seed. On 2 cores the main job's
mean moved by 0.07 between two seeds of one config (benchmarks/results/ablations.md), more than most
switches: compare variants over several seeds.

Writes benchmarks/results/ablations.json and .md (scores per task, mean, and the change against `full`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from st_synth import pipeline

HEURISTIC_PAIRS = [
    "lee_background=builtin:lee-background-pairs|Retrieve semantically similar text.",
    "wiki_sections=builtin:wikipedia-section-pairs|Given a Wikipedia article title and section heading, retrieve the passage of that section.",
]
VARIANTS: dict[str, dict[str, dict]] = {
    "full": {},
    "no_filter": {"filter": {"enabled": False}},
    "no_mining": {"mine": {"enabled": False}},
    "free_generation": {
        "generate": {"corpus": None, "grounded_kinds": None, "grounded_prompts": None, "num_examples": 160,
                     "kinds": {"retrieval": 2, "classification": 1, "short_short": 1, "long_long": 1, "sts": 2}},
        "mine": {"enabled": False},
        "train": {"max_seq_length": 64},
    },
    "heuristic_added": {"train": {"extra_datasets": HEURISTIC_PAIRS, "max_examples_per_source": 160}},
    "no_instructions": {"train": {"use_instructions": False}, "evaluate": {"instructions": False}},
    "with_instructions": {"train": {"use_instructions": True}, "evaluate": {"instructions": True}},
    "no_hard_negatives": {"train": {"hard_negatives": False}},
    "mined_negatives": {"mine": {"enabled": True, "replace_negatives": True}},
    "retellings_only": {"generate": {"kinds": {"long_long": 1}, "num_examples": 260}},
    "retellings": {},  # train.extra_datasets from --prose_pairs (retelling_sources)
}  # fmt: skip
PROSE_SOURCES = ("lee", "wiki")  # bench_prose_pairs.py's folders: <prompt>_lee, <prompt>_wiki


def prose_sources(prompt: str, folder: str | Path) -> list[str]:
    """``train.extra_datasets`` entries for bench_prose_pairs.py's ``prompt`` pairs under ``folder``."""
    return [f"{prompt}_{name}={Path(folder) / f'{prompt}_{name}'}|Retrieve semantically similar text."
            for name in PROSE_SOURCES]  # fmt: skip


def retelling_sources(folder: str | Path) -> list[str]:
    """``train.extra_datasets`` entries for bench_prose_pairs.py's retellings under ``folder``."""
    missing = [
        f"retelling_{name}" for name in PROSE_SOURCES if not (Path(folder) / f"retelling_{name}").is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"No {', '.join(missing)} under {folder}: run `python benchmarks/bench_prose_pairs.py --variants "
            f"retelling --output {folder}` first, or point --prose_pairs at its output."
        )
    return prose_sources("retelling", folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/configs/local-smollm2.yaml")
    parser.add_argument("--output", default="outputs/ablations")
    parser.add_argument("--variants", default=None, help=f"Any of: {', '.join(VARIANTS)}.")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--results", default="benchmarks/results/ablations")
    parser.add_argument(
        "--seeds", default=None, help="Training seeds, e.g. 42,43,44 (default: the config's)."
    )
    parser.add_argument(
        "--prose_pairs", default="outputs/bench-prose-pairs",
        help="bench_prose_pairs.py's --output, for the retellings variant",
    )  # fmt: skip
    args = parser.parse_args()

    from st_synth.pipeline import parse_overrides

    base = parse_overrides(args.set)
    if args.variants is None:
        trains_with = pipeline.plan_run(pipeline.load_config(args.config, base)).data_args.use_instructions
        skip = "with_instructions" if trains_with else "no_instructions"
        args.variants = ",".join(name for name in VARIANTS if name not in (skip, "retellings"))
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    own_seed = pipeline.plan_run(pipeline.load_config(args.config, base)).training_args.seed
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [own_seed]
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, got {args.seeds!r}")
    variants = dict(VARIANTS)
    if "retellings" in names:
        try:
            variants["retellings"] = {"train": {"extra_datasets": retelling_sources(args.prose_pairs)}}
        except FileNotFoundError as error:
            parser.error(str(error))
    plans = {}
    for name in names:  # every variant and seed is validated before the first one starts
        for seed in seeds:
            overrides = {
                section: {**base.get(section, {}), **values} for section, values in variants[name].items()
            }
            overrides = {**base, **overrides}
            overrides["train"] = {**overrides.get("train", {}), "seed": seed}
            # "full" with the config's own seed is the main job itself: its output and model are reused.
            reused = name == "full" and seed == own_seed
            if not reused:
                overrides.setdefault("evaluate", {}).update({"reference": None, "baseline": False})
            config = pipeline.load_config(args.config, overrides)
            if not reused:
                config["output"] = str(
                    Path(args.output) / (name if len(seeds) == 1 else f"{name}-seed{seed}")
                )
            plans[name, seed] = pipeline.plan_run(config)
    runs, baseline = {}, None
    for (name, seed), plan in plans.items():
        started = time.perf_counter()
        summary = pipeline.run(
            plan, echo=lambda line, _n=name, _s=seed: print(f"[{_n} {_s}] {line}", flush=True)
        )
        baseline = baseline or summary["evaluation"].get("untrained")
        runs.setdefault(name, []).append({"seed": seed, "scores": summary["evaluation"]["trained"],
                                          "train_rows": sum(summary["training"]["sources"].values()),
                                          "wall_s": round(time.perf_counter() - started, 1)})  # fmt: skip
    rows = {name: summarize(done) for name, done in runs.items()}
    payload = {"config": args.config, "overrides": args.set, "machine": platform.processor() or platform.machine(),
               "seeds": seeds, "untrained": baseline, "variants": rows}  # fmt: skip
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    results.with_suffix(".md").write_text(render(payload) + "\n")
    print(render(payload))


def summarize(runs: list[dict]) -> dict:
    """One variant over its seeds: per task the mean over seeds, the mean over tasks, and the lowest and
    highest mean of a single seed."""
    tasks = list(runs[0]["scores"])
    means = [sum(run["scores"].values()) / len(tasks) for run in runs]
    return {"scores": {task: sum(run["scores"][task] for run in runs) / len(runs) for task in tasks},
            "mean": sum(means) / len(means), "seed_means": [min(means), max(means)],
            "train_rows": runs[0]["train_rows"], "runs": runs}  # fmt: skip


def render(payload: dict) -> str:
    variants = payload["variants"]
    tasks = list(next(iter(variants.values()))["scores"])
    reference = variants.get("full")
    seeds = payload.get("seeds") or [None]
    spread = len(seeds) > 1
    header = f" | mean | seeds {', '.join(map(str, seeds))}: lowest-highest mean" if spread else " | mean"
    lines = ["| variant | train rows | " + " | ".join(tasks) + header + " | mean - full |",
             "|---" * (len(tasks) + 4 + spread) + "|"]  # fmt: skip
    if payload.get("untrained"):
        untrained = payload["untrained"]
        mean = sum(untrained.values()) / len(untrained)
        delta = f"{mean - reference['mean']:+.4f}" if reference else ""
        cells = " | ".join(f"{untrained[t]:.4f}" for t in tasks)
        lines.append(f"| untrained backbone | 0 | {cells} | {mean:.4f} |{' |' if spread else ''} {delta} |")
    for name, row in variants.items():
        delta = f"{row['mean'] - reference['mean']:+.4f}" if reference else ""
        cells = " | ".join(f"{row['scores'][t]:.4f}" for t in tasks)
        span = f" {row['seed_means'][0]:.4f}-{row['seed_means'][1]:.4f} |" if spread else ""
        lines.append(f"| {name} | {row['train_rows']} | {cells} | {row['mean']:.4f} |{span} {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
