"""The evaluate stage, one function for ``st-synth evaluate`` and the run's evaluate step: the trained model,
the models compared with it (the untrained backbone, a reference encoder) and the trained model's other
readings (cut sizes, quantized precisions), each scored on the same tasks with the same settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from st_synth.common.prepared import fingerprint as fingerprint_of
from st_synth.evaluation.evaluate import EvaluationArguments, evaluate


@dataclass
class EvaluationResult:
    """What the evaluate stage gives.

    Attributes:
        scores: model name -> task -> main score: ``untrained`` and ``trained`` first where they were
            scored, then the reference encoder, then one column per cut size (``"256 dims"``) and precision.
        trained: the trained model's whole record (mteb's results, the summary, and ``by_dimension`` /
            ``by_precision`` when those were asked for), as written to a results file.
    """

    scores: dict[str, dict[str, float]]
    trained: dict[str, Any]


def evaluate_models(
    settings: EvaluationArguments,
    model: str | Path,
    *,
    tasks: list[Any] | None = None,
    base_model: str | None = None,
    instruction_template: str | None = None,
    cache_dir: str | Path | None = None,
    results_dir: str | Path | None = None,
    model_fingerprint: str | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> EvaluationResult:
    """Score the model folder ``model`` and what ``settings`` compares it with.

    Args:
        settings: the evaluation's settings (tasks, instructions, protocol, baseline, reference, variants).
        model: the trained model's folder (or Hub id).
        tasks: the mteb tasks, already resolved (default: ``settings.resolve()``).
        base_model, instruction_template: the backbone the model was trained from and its template, for the
            ``untrained`` baseline (a recipe-trained folder's card facts name them).
        cache_dir: where a shortcut backbone (``smollm2-135m``, ``tiny``) is prepared.
        results_dir: where each model's record is written (``trained.json``, ``untrained.json``,
            ``reference.json``, ``trained-<variant>.json``) and, when ``model_fingerprint`` is given, read back
            instead of scoring again while the model and settings are unchanged.
        model_fingerprint: what identifies the trained model's weights (a digest of its data and settings).
        echo: receives one line per model scored or reused.

    Returns:
        An :class:`EvaluationResult`.
    """
    tasks = settings.resolve() if tasks is None else tasks
    task_names = [task.metadata.name for task in tasks]
    folder = Path(results_dir) if results_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def scored(name: str, fingerprint: str | None, load: Callable[[], Any], instructions: bool,
               **extra: Any) -> dict[str, Any]:  # fmt: skip
        key = None if fingerprint is None else fingerprint_of(fingerprint, task_names, instructions, settings.max_seq_length,
                                                   settings.task_instructions, settings.protocol, extra)  # fmt: skip
        path = folder / f"{name}.json" if folder is not None else None
        if key is not None and path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key:
                echo(f"{name}: unchanged, scores from {path}")
                return saved
        payload = evaluate(load(), tasks, overrides=settings.overrides, use_instructions=instructions,
                           batch_size=settings.batch_size, max_seq_length=settings.max_seq_length,
                           protocol=settings.protocol, **extra)  # fmt: skip
        if key is not None:
            payload["fingerprint"] = key
        if path is not None:
            path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        echo(f"{name}: " + ", ".join(f"{task} {score:.4f}" for task, score in payload["summary"]["main_score"].items())
             + f" ({payload['summary']['wall_time_s']:.0f} s)")  # fmt: skip
        return payload

    def load_trained() -> Any:
        return str(model)

    compared = settings.compared_models(base_model, instruction_template, cache_dir=cache_dir)
    scores: dict[str, dict[str, float]] = {}
    if "untrained" in compared:
        fingerprint, load, instructions = compared.pop("untrained")
        scores["untrained"] = scored("untrained", fingerprint, load, instructions)["summary"]["main_score"]
    trained = scored("trained", model_fingerprint, load_trained, settings.instructions)
    scores["trained"] = trained["summary"]["main_score"]
    for name, (fingerprint, load, instructions) in compared.items():
        scores[name] = scored("reference", fingerprint, load, instructions)["summary"]["main_score"]
    variants = {}  # cut sizes (Matryoshka) and quantized precisions
    for name, extra in settings.variants().items():
        label = f"trained-{next(iter(extra.values()))}"
        variants[name] = scored(label, model_fingerprint, load_trained, settings.instructions, **extra)[
            "summary"
        ]
    scores.update({name: summary["main_score"] for name, summary in variants.items()})
    if variants:
        trained["by_dimension"] = {
            dim: variants[f"{dim} dims"]["main_score"] for dim in settings.truncate_dim
        }
        trained["by_precision"] = {p: {"main_score": variants[p]["main_score"],
                                       "bytes_per_vector": variants[p]["bytes_per_vector"]}
                                   for p in settings.precision}  # fmt: skip
        if folder is not None:
            (folder / "trained.json").write_text(json.dumps(trained, indent=2, default=str) + "\n")
    return EvaluationResult(scores=scores, trained=trained)
