"""A model soup of training seeds: the weights of several trained models of one config averaged (uniform soup,
as Wortsman et al. 2022; Qwen3-Embedding merges its checkpoints the same way), against the seeds one by one.

The runs share the backbone and differ only in their LoRA weights (merged into ``model/final``), so the
average is the backbone plus the mean of the seeds' LoRA updates: one model, the cost of one.

    python benchmarks/bench_soup.py --runs outputs/bench-domain/main-42,outputs/bench-domain/main-43,\\
        outputs/bench-domain/main-44

Each run's own scores on the visible tasks are read from its ``run_summary.json``; the soup is scored on the
same tasks with the same settings (``evaluate`` section of the main job's config), and on the domain benchmark
(``TorchDocsRetrieval``, ``bench_domain.py``; the seeds' scores there are read from ``domain.json``). No text
of any evaluated task is trained on: the soup holds nothing its runs did not (each run's decontamination and
``bench_domain.py``'s query check apply to it).

Writes ``benchmarks/results/soup.json`` and ``soup.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _results import current_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOMAIN_TASK = "TorchDocsRetrieval"


def average_models(folders: list[Path], output: Path):
    """A SentenceTransformer whose every floating-point weight is the mean of ``folders``' (the same
    architecture each), saved to ``output``."""
    from sentence_transformers import SentenceTransformer

    soup = SentenceTransformer(str(folders[0]), device="cpu")
    total = {name: value.detach().clone().double() for name, value in soup.state_dict().items()}
    for folder in folders[1:]:
        other = SentenceTransformer(str(folder), device="cpu").state_dict()
        if other.keys() != total.keys():
            raise SystemExit(f"{folder} is not the same architecture as {folders[0]}")
        for name, value in other.items():
            total[name] += value.double()
        del other
    state = soup.state_dict()
    averaged = {
        name: (total[name] / len(folders)).to(value.dtype) if value.is_floating_point() else value
        for name, value in state.items()
    }
    soup.load_state_dict(averaged)
    output.mkdir(parents=True, exist_ok=True)
    soup.save(str(output))
    return soup


def score(model, tasks: list[str], settings: dict) -> dict[str, float]:
    from st_synth.evaluation.evaluate import evaluate, resolve_tasks

    payload = evaluate(model, resolve_tasks(tasks), use_instructions=settings.get("instructions", False),
                       batch_size=settings.get("batch_size", 16), max_seq_length=settings.get("max_seq_length", 128),
                       protocol=settings.get("protocol", "st-synth"))  # fmt: skip
    return {task: round(float(value), 4) for task, value in payload["summary"]["main_score"].items()}


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", required=True, help="Comma-separated run folders of one config, one per seed."
    )
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "local-smollm2.yaml"))
    parser.add_argument("--output", default=str(ROOT / "outputs" / "soup"))
    parser.add_argument(
        "--domain_row", default="main", help="bench_domain.py's row these runs are (main, domain)."
    )
    args = parser.parse_args()
    runs = [Path(run) for run in args.runs.split(",") if run]
    if len(runs) < 2:
        raise SystemExit("--runs needs at least two run folders")
    settings = yaml.safe_load(Path(args.config).read_text())["evaluate"]
    tasks = settings["tasks"]
    seeds = {}
    for run in runs:
        summary = json.loads((run / "run_summary.json").read_text())
        seed = run.name.rsplit("-", 1)[-1]  # bench_domain.py's folders: <row>-<seed>
        seeds[seed] = {
            task: round(float(value), 4) for task, value in summary["evaluation"]["trained"].items()
        }
    domain = json.loads((RESULTS / "domain.json").read_text()).get(args.domain_row, {}).get("seeds", {})
    for seed, scores in seeds.items():
        if seed in domain:
            scores[DOMAIN_TASK] = domain[seed]["ndcg_at_10"]
    started = time.perf_counter()
    soup = average_models([run / "model" / "final" for run in runs], Path(args.output))
    soup_scores = score(soup, tasks, settings)
    soup_scores[DOMAIN_TASK] = score(soup, [DOMAIN_TASK], {**settings, "instructions": False})[DOMAIN_TASK]
    elapsed = time.perf_counter() - started
    columns = [*tasks, DOMAIN_TASK]
    mean_of_seeds = {
        task: round(statistics.mean(scores[task] for scores in seeds.values()), 4)
        for task in columns
        if all(task in scores for scores in seeds.values())
    }
    commit = current_commit()
    payload = {"runs": [str(run) for run in runs], "seeds": seeds, "mean_of_seeds": mean_of_seeds,
               "soup": soup_scores, "seconds": round(elapsed, 1), "date": time.strftime("%Y-%m-%d"),
               "commit": commit}  # fmt: skip
    (RESULTS / "soup.json").write_text(json.dumps(payload, indent=2) + "\n")

    def visible_mean(scores: dict) -> str:
        return f"{statistics.mean(scores[task] for task in tasks):.4f}"

    lines = [
        "# A soup of training seeds against the seeds one by one",
        "",
        f"`python benchmarks/bench_soup.py` ({payload['date']}, commit {commit}): the weights of {len(runs)} "
        f"runs of `{Path(args.config).name}` (training seeds {', '.join(seeds)}) averaged into one model. "
        "Visible tasks as the main job evaluates them; TorchDocsRetrieval is `bench_domain.py`'s benchmark.",
        "",
        f"| model | {' | '.join(columns)} | mean of the visible three |",
        f"|---|{'---|' * len(columns)}---|",
    ]
    for seed, scores in seeds.items():
        cells = " | ".join(f"{scores[task]:.4f}" if task in scores else "" for task in columns)
        lines.append(f"| seed {seed} | {cells} | {visible_mean(scores)} |")
    cells = " | ".join(f"{mean_of_seeds[task]:.4f}" if task in mean_of_seeds else "" for task in columns)
    lines.append(f"| mean of the seeds | {cells} | {visible_mean(mean_of_seeds)} |")
    cells = " | ".join(f"{soup_scores[task]:.4f}" for task in columns)
    lines.append(f"| **soup** | {cells} | {visible_mean(soup_scores)} |")
    (RESULTS / "soup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
