"""Domain adaptation: what training on your own documents gives, in the GPL protocol (train on a corpus without
its queries, evaluate on the queries).

The domain is ``TorchDocsRetrieval`` (``st_synth.data.offline_tasks``): the API documentation of the torch
release the install pins, so every machine builds the same benchmark; each summary sentence is a query nobody
here wrote, the rest of its docstring the document to retrieve among all of them. Rows, scored with nDCG@10
and without instructions (as the main job trains):

* ``untrained``: the SmolLM2-135M backbone the main job starts from;
* ``main job``: ``recipes/configs/local-smollm2.yaml`` as README runs it (news retellings and free generation);
* ``domain``: the same config with one ``--set generate.corpus=[FOLDER]``, FOLDER holding the documents
  alone (one ``.txt`` each; the queries are never written there), as a user would point it at their files;
* ``all-MiniLM-L6-v2``: a strong small supervised encoder.

Each trained row is run once per training seed (``--seeds``; generation is the same for every seed and comes
from the answer cache after the first); a later invocation with other seeds adds them to the recorded ones.
Before a trained model is scored, its training data is checked against the queries (exact after normalisation,
or a shared 13-word run): a query in the training data stops the benchmark. ``--rows`` picks which trained rows
to run (``main``, ``domain``); the others reuse earlier results.

    python benchmarks/bench_domain.py --seeds 42,43,44

Results go to ``benchmarks/results/domain.json`` and ``domain.md`` (with the share of the main job's gap to
all-MiniLM-L6-v2 that the domain rows close).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import current_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "recipes" / "configs" / "local-smollm2.yaml"
TASK = "TorchDocsRetrieval"


def write_corpus(folder: Path) -> list[str]:
    """The task's documents, one file each, under ``folder`` (replaced); returns its queries (the summaries that
    no document repeats: ``torch_doc_queries``)."""
    import shutil

    from st_synth.data.offline_tasks import torch_doc_pairs, torch_doc_queries

    pairs = torch_doc_pairs()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for number, (_, document) in enumerate(pairs):
        (folder / f"{number:04d}.txt").write_text(document + "\n", encoding="utf-8")
    return [pairs[number][0] for number in torch_doc_queries(pairs)]


def check_no_query_trained_on(data_folder: Path, queries: list[str]) -> dict[str, int]:
    """Rows of the run's training data that overlap a query, per kind; raises when there is any."""
    from st_synth.data.decontamination import Decontaminator
    from st_synth.data.examples import load_examples

    _, report = Decontaminator(queries).apply(load_examples(data_folder))
    if report["dropped"]:
        raise SystemExit(f"{data_folder} holds {report['dropped']} rows that overlap the benchmark's queries: "
                         f"{report['sources']}. Scores from it would be worthless.")  # fmt: skip
    return {name: entry["rows"] for name, entry in report["sources"].items()}


def score(model, instructions: bool = False) -> float:
    """nDCG@10 of ``model`` (a SentenceTransformer or a folder) on the task."""
    from st_synth.evaluation.evaluate import evaluate, resolve_tasks

    payload = evaluate(model, resolve_tasks([TASK]), use_instructions=instructions, batch_size=16,
                       max_seq_length=128, protocol="st-synth")  # fmt: skip
    return round(float(payload["summary"]["main_score"][TASK]), 4)


def train(row: str, seed: int, corpus: Path, work: Path) -> Path:
    """Run the main job's config for one row and seed (its own output folder); return the run folder."""
    output = work / f"{row}-{seed}"
    command = [sys.executable, "-m", "st_synth.cli", "run", "--config", str(CONFIG), "--output", str(output),
               "--set", f"train.seed={seed}"]  # fmt: skip
    if row == "domain":
        command += ["--set", f"generate.corpus=[{corpus}]"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"{row} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--rows", default="main,domain", help="Trained rows to run now: main, domain.")
    parser.add_argument(
        "--rescore", action="store_true", help="Score the untrained and reference rows again."
    )
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-domain"))
    args = parser.parse_args()
    from st_synth.data.guide import load_guide
    from st_synth.evaluation.evaluate import EvaluationArguments
    from st_synth.model.embedder import DEFAULT_INSTRUCTION_TEMPLATE

    work = Path(args.work)
    commit = current_commit()
    corpus = work / "corpus"
    queries = write_corpus(corpus)
    path = RESULTS / "domain.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    import torch

    task = {"queries": len(queries), "documents": len(list(corpus.iterdir())), "torch": torch.__version__}
    compared = EvaluationArguments(tasks=[TASK], baseline=True, reference="all-MiniLM-L6-v2", instructions=False,
                                   max_seq_length=128).compared_models("smollm2-135m", DEFAULT_INSTRUCTION_TEMPLATE, cache_dir=work)  # fmt: skip
    if results.get("task") != task:  # scored on another version of the task: nothing carries over
        results = {}
    if args.rescore or "untrained" not in results:
        results["untrained"] = score(compared["untrained"][1]())
        results["all-MiniLM-L6-v2"] = score(load_guide("all-MiniLM-L6-v2"))
        results["untrained_and_reference_scored"] = {"date": time.strftime("%Y-%m-%d"), "commit": commit}
    results["task"] = task
    for row in [r for r in args.rows.split(",") if r]:
        if row not in ("main", "domain"):
            raise SystemExit(f"Unknown row {row!r}; choose main or domain.")
        # Seeds run now replace their earlier entries; the others stay (each seed keeps its date and commit).
        runs = results.get(row, {}).get("seeds", {})
        for seed in (int(s) for s in args.seeds.split(",")):
            run = train(row, seed, corpus, work)
            rows = check_no_query_trained_on(run / "data", queries)
            runs[str(seed)] = {"ndcg_at_10": score(str(run / "model" / "final")), "training_rows": rows,
                               "date": time.strftime("%Y-%m-%d"), "commit": commit}  # fmt: skip
            runs = dict(sorted(runs.items()))
            values = [entry["ndcg_at_10"] for entry in runs.values()]
            results[row] = {"seeds": runs, "mean": round(statistics.mean(values), 4)}
            # A stopped benchmark keeps its finished seeds.
            path.write_text(json.dumps(results, indent=2) + "\n")
    path.write_text(json.dumps(results, indent=2) + "\n")
    scored = results["untrained_and_reference_scored"]
    lines = ["# Domain adaptation: TorchDocsRetrieval (nDCG@10)", "",
             f"`python benchmarks/bench_domain.py` (see its docstring): {len(queries)} torch API summaries, each to "
             f"retrieve the rest of its docstring among {task['documents']} (summaries a document repeats are no "
             "query); trained rows are the main job's config, the domain row with "
             "`--set generate.corpus=[the documents]`; no query in any training row (checked).", "",
             "| model | seeds | nDCG@10 (mean) | per seed | date | commit |", "|---|---|---|---|---|---|",
             f"| untrained SmolLM2-135M | | {results['untrained']:.4f} | | {scored['date']} | {scored['commit']} |"]  # fmt: skip
    for row, label in (("main", "main job"), ("domain", "main job + generate.corpus")):
        if row in results:
            entry = results[row]
            per_seed = ", ".join(
                f"{seed}: {value['ndcg_at_10']:.4f}" for seed, value in entry["seeds"].items()
            )
            dates = ", ".join(sorted({value["date"] for value in entry["seeds"].values()}))
            commits = ", ".join(sorted({value["commit"] for value in entry["seeds"].values()}))
            lines.append(
                f"| {label} | {len(entry['seeds'])} | {entry['mean']:.4f} | {per_seed} | {dates} | {commits} |"
            )
    lines.append(
        f"| all-MiniLM-L6-v2 | | {results['all-MiniLM-L6-v2']:.4f} | | {scored['date']} | {scored['commit']} |"
    )
    if "main" in results and "domain" in results:
        gap = results["all-MiniLM-L6-v2"] - results["main"]["mean"]
        closed = (results["domain"]["mean"] - results["main"]["mean"]) / gap if gap > 0 else float("nan")
        lines += ["", f"The domain rows close {closed:.0%} of the main job's gap to all-MiniLM-L6-v2."]
    (RESULTS / "domain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
