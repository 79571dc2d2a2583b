"""Ablations of the main job: same synthetic data, same seed, one switch at a time.

    python benchmarks/bench_ablations.py --config recipes/configs/local-smollm2-grounded.yaml \
        --variants full,no_filter,no_mining,heuristic_added,free_generation

Variants (each a full `st-synth run` under OUTPUT/<variant>; generation answers come from the cache, so
variants that generate the same requests train on the same examples):

* full:              the config as it is: for the main job, generation grounded in the shipped corpora,
                     round-trip filter, mined negatives (its output folder, so a finished main job is reused)
* no_filter:         every validated example, unfiltered
* no_mining:         no mined negatives: grounded retrieval, title and summary pairs train on in-batch
                     negatives only (sts keeps its LLM-written near-misses)
* free_generation:   the paper's free generation instead (no corpus; the LLM writes both sides and the
                     negatives of retrieval, classification and sts), with the earlier main job's mix of
                     kinds and number of examples
* heuristic_added:   the grounded data plus the two heuristic pairs sources of earlier main jobs
                     (builtin:lee-background halves, builtin:wiki-sections; 160 pairs each)
* no_instructions / with_instructions: queries without / with their task instruction, in training and in
                     evaluation (the default list holds whichever of the two differs from the config)
* no_hard_negatives: in-batch negatives only (neither mined nor LLM-written negatives)

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
    "lee_background=builtin:lee-background|Retrieve semantically similar text.",
    "wiki_sections=builtin:wiki-sections|Given a Wikipedia article title and section heading, retrieve the passage of that section.",
]
VARIANTS: dict[str, dict[str, dict]] = {
    "full": {},
    "no_filter": {"filter": {"enabled": False}},
    "no_mining": {"mine": {"enabled": False}},
    "free_generation": {
        "generate": {"corpus": None, "num_examples": 160,
                     "kinds": {"retrieval": 2, "classification": 1, "short_short": 1, "long_long": 1, "sts": 2}},
        "mine": {"enabled": False},
        "train": {"max_seq_length": 64},
    },
    "heuristic_added": {"train": {"extra_datasets": HEURISTIC_PAIRS, "max_examples_per_source": 160}},
    "no_instructions": {"train": {"use_instructions": False}, "evaluate": {"instructions": False}},
    "with_instructions": {"train": {"use_instructions": True}, "evaluate": {"instructions": True}},
    "no_hard_negatives": {"train": {"hard_negatives": False}},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/configs/local-smollm2.yaml")
    parser.add_argument("--output", default="outputs/ablations")
    parser.add_argument("--variants", default=None, help=f"Any of: {', '.join(VARIANTS)}.")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--results", default="benchmarks/results/ablations")
    args = parser.parse_args()

    from st_synth.cli import _parse_sets

    base = _parse_sets(args.set)
    if args.variants is None:
        trains_with = pipeline.plan_run(pipeline.load_config(args.config, base)).data_args.use_instructions
        skip = "with_instructions" if trains_with else "no_instructions"
        args.variants = ",".join(name for name in VARIANTS if name != skip)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    plans = {}
    for name in names:  # every variant is validated before the first one starts
        overrides = {
            section: {**base.get(section, {}), **values} for section, values in VARIANTS[name].items()
        }
        overrides = {**base, **overrides}
        if name != "full":
            overrides.setdefault("evaluate", {}).update({"reference": None, "baseline": False})
        config = pipeline.load_config(args.config, overrides)
        if name != "full":  # "full" is the main job itself: its output (and trained model) are reused
            config["output"] = str(Path(args.output) / name)
        plans[name] = pipeline.plan_run(config)
    rows, baseline = {}, None
    for name, plan in plans.items():
        started = time.perf_counter()
        summary = pipeline.run(plan, echo=lambda line, _n=name: print(f"[{_n}] {line}", flush=True))
        scores = summary["evaluation"]["trained"]
        baseline = baseline or summary["evaluation"].get("untrained")
        rows[name] = {"scores": scores, "mean": sum(scores.values()) / len(scores),
                      "train_rows": sum(summary["training"]["sources"].values()),
                      "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    payload = {"config": args.config, "overrides": args.set, "machine": platform.processor() or platform.machine(),
               "untrained": baseline, "variants": rows}  # fmt: skip
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    results.with_suffix(".md").write_text(render(payload) + "\n")
    print(render(payload))


def render(payload: dict) -> str:
    variants = payload["variants"]
    tasks = list(next(iter(variants.values()))["scores"])
    reference = variants.get("full")
    lines = ["| variant | train rows | " + " | ".join(tasks) + " | mean | mean - full |",
             "|---" * (len(tasks) + 4) + "|"]  # fmt: skip
    if payload.get("untrained"):
        untrained = payload["untrained"]
        mean = sum(untrained.values()) / len(untrained)
        delta = f"{mean - reference['mean']:+.4f}" if reference else ""
        cells = " | ".join(f"{untrained[t]:.4f}" for t in tasks)
        lines.append(f"| untrained backbone | 0 | {cells} | {mean:.4f} | {delta} |")
    for name, row in variants.items():
        delta = f"{row['mean'] - reference['mean']:+.4f}" if reference else ""
        lines.append(f"| {name} | {row['train_rows']} | " + " | ".join(f"{row['scores'][t]:.4f}" for t in tasks)
                     + f" | {row['mean']:.4f} | {delta} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
