"""Does SmolLM2-135M's *prose* about a real passage teach the embedder? (issue 18)

    python benchmarks/bench_prose_pairs.py --variants follow_on,retelling           # ~20 min a variant, 2 cores
    python benchmarks/bench_prose_pairs.py --variants retelling,retelling_plus_heuristic

The grounded kinds (st_synth/generation/grounding.py) ask for JSON under a schema, and SmolLM2-135M answers them mostly by
copying the passage or writing one short sentence; the heuristic pairs (a news document's two halves, a
Wikipedia heading and its paragraph) are what teach the main job. This benchmark asks the same local server
for a long text in plain prose, no response format, on the same real texts the heuristic pairs come from (the
first halves of the first 160 usable `lee_background.cor` documents, clipped to 70 words, and the first 160
`builtin:wikipedia-section-pairs` paragraphs), and trains on pairs (real text, LLM text):

* follow_on:  "Here is the start of a text ... What comes next? Write the next paragraph of the text."
* retelling:  "Here is a news story / a text ... Retell this story / text in your own words, in three or four
              sentences."
* retelling_plus_heuristic: the retellings together with the two heuristic pairs sources (160 each).
* heuristic_only: the two heuristic pairs sources alone (the control for the variant above).

An answer under 15 words, or with half or more of its word 5-grams in its passage (grounding's copy check), is
dropped and counted. Training and evaluation are the heuristic main job's (local-smollm2-heuristic.yaml: 64 tokens,
in-batch negatives, decontaminated against the evaluated tasks) with the pairs as its only training sources
(`train.extra_datasets`); the trained model is evaluated as the main job evaluates (no instructions, 128
tokens). The config's epochs too: two since 1fe0638; the results in prose-pairs.json were trained with one.
Writes benchmarks/results/prose-pairs.json and .md. The retellings with the main job's free generation
instead of its heuristic pairs, over seeds: `bench_ablations.py --variants full,retellings --seeds 42,43,44`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_ablations import (  # this folder is on the path
    HEURISTIC_PAIRS,  # the same two sources as the main job's
    prose_sources,
)

from st_synth import pipeline

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "local-smollm2-heuristic.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = {
    "follow_on": lambda source, text: (
        f"Here is the start of a text:\n\n{text}\n\nWhat comes next? Write the next paragraph of the text."
    ),
    "retelling": lambda source, text: (
        ("Here is a news story:\n\n" if source == "lee" else "Here is a text:\n\n") + text
        + "\n\nRetell this " + ("story" if source == "lee" else "text") + " in your own words, in three or four sentences."
    ),
}  # fmt: skip
VARIANTS = {
    "follow_on": ("follow_on", False),
    "retelling": ("retelling", False),
    "retelling_plus_heuristic": ("retelling", True),
    "heuristic_only": (None, True),
}
MIN_WORDS = 15
CLIP_WORDS = 70


def real_texts(per_source: int) -> list[tuple[str, str]]:
    """(source, text): the first halves of the news documents and the Wikipedia paragraphs the heuristic
    pairs sources start from."""
    from st_synth.data.offline_tasks import lee_background_pairs, wikipedia_section_pairs

    halves = list(lee_background_pairs()["query"])  # each document's first half
    wiki = list(wikipedia_section_pairs()["positive"])
    return [("lee", text) for text in halves[:per_source]] + [("wiki", text) for text in wiki[:per_source]]


def generate(prompt: str, per_source: int, folder: Path) -> dict:
    """Ask the packaged SmolLM2 (llama.cpp on 127.0.0.1) for one prose answer per real text; save one
    `datasets` folder of (query = real text, positive = answer) pairs per source."""
    from datasets import Dataset
    from openai import OpenAI

    from st_synth.generation.grounding import copied_share
    from st_synth.generation.local_llm import LocalLLMServer

    jobs = real_texts(per_source)
    pairs: dict[str, list[tuple[str, str]]] = {"lee": [], "wiki": []}
    drops = {"short": 0, "copied_from_passage": 0}
    tokens = [0, 0]
    started = time.perf_counter()
    with LocalLLMServer(threads=2) as server:
        client = OpenAI(base_url=server.base_url, api_key="local")
        for number, (source, text) in enumerate(jobs):
            clipped = " ".join(text.split()[:CLIP_WORDS])
            response = client.chat.completions.create(
                model=server.served_model, max_tokens=80, temperature=0.7, seed=number,
                messages=[{"role": "user", "content": PROMPTS[prompt](source, clipped)}],
            )  # fmt: skip
            tokens[0] += response.usage.prompt_tokens
            tokens[1] += response.usage.completion_tokens
            answer = " ".join((response.choices[0].message.content or "").split())
            if len(answer.split()) < MIN_WORDS:
                drops["short"] += 1
            elif copied_share(answer, text) >= 0.5:
                drops["copied_from_passage"] += 1
            else:
                pairs[source].append((text, answer))
    for source, rows in pairs.items():
        Dataset.from_dict({"query": [q for q, _ in rows], "positive": [a for _, a in rows]}).save_to_disk(
            str(folder / f"{prompt}_{source}")
        )
    return {"requests": len(jobs), "kept": {source: len(rows) for source, rows in pairs.items()}, "drops": drops,
            "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "wall_time_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def train_and_evaluate(sources: list[str], output: Path) -> dict:
    """The main job's training and evaluation stages on ``sources`` (extra datasets) alone."""
    from datasets import Dataset, DatasetDict

    config = pipeline.load_config(CONFIG)
    config["output"] = str(output)
    config["train"]["extra_datasets"] = sources
    config["evaluate"].update(baseline=False, reference=None)
    plan = pipeline.plan_run(config)
    plan.data_args.dataset = None  # no generated dataset: the pairs are the only training sources
    placeholder = plan.output / pipeline.RUN_DATA_DIR  # what the stage's fingerprint reads (not trained on)
    if not placeholder.is_dir():
        DatasetDict({"none": Dataset.from_dict({"query": ["-"], "positive": ["-"]})}).save_to_disk(
            str(placeholder)
        )
    stages = pipeline._Stages(plan, print)
    training = pipeline._train(plan, stages)
    scores = pipeline._evaluate(plan, stages, training["fingerprint"])["trained"]
    return {"training": {key: training[key] for key in ("train_loss", "global_steps", "sources")},
            "scores": scores, "mean": round(sum(scores.values()) / len(scores), 4), "timings_s": stages.timings}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="follow_on,retelling", help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--per_source", type=int, default=160, help="real texts per source (news, Wikipedia)")
    parser.add_argument(
        "--output", default="outputs/bench-prose-pairs", help="data and models (not committed)"
    )
    parser.add_argument("--results", default=str(RESULTS / "prose-pairs"), help="results file stem")
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose among: {', '.join(VARIANTS)}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results).with_suffix(".json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    generated: dict[str, dict] = {}
    for name in args.variants.split(","):
        prompt, heuristic = VARIANTS[name]
        sources = list(HEURISTIC_PAIRS) if heuristic else []
        entry: dict = {"per_source": args.per_source}
        if prompt:
            if prompt not in generated and not (output / f"{prompt}_lee").is_dir():
                generated[prompt] = generate(prompt, args.per_source, output)
            entry["generation"] = generated.get(prompt, "reused from an earlier run of this script")
            sources += prose_sources(prompt, output)
        entry.update(train_and_evaluate(sources, output / name))
        results[name] = entry
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {entry['scores']} mean {entry['mean']}")
    lines = ["| variant | train rows | LeeDocSTS | MiniNewsgroupsClassification | ChatterbotQARetrieval | mean |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in results.items():
        scores = entry["scores"]
        rows = sum(entry["training"]["sources"].values())
        lines.append(
            f"| {name} | {rows} | "
            + " | ".join(f"{scores[t]:.4f}" for t in scores)
            + f" | {entry['mean']:.4f} |"
        )
    results_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
