"""Dataset and model cards, rendered from the Jinja templates in ``model_card_templates/``."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from datasets import DatasetDict

from st_synth.common.arguments import current_setting_name
from st_synth.common.languages import ISO_CODES
from st_synth.common.names import ADAPTER_DIR, CARD_DATA_FILE, FINAL_DIR, RUN_MODEL_DIR
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.examples import InstructionFormat


def _template(name: str) -> jinja2.Template:
    text = (resources.files("st_synth.model_card_templates") / name).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(text)


def _size_category(rows: int) -> str:
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < bound:
            return label
    return "1M<n<10M"


def language_codes(labels: Any) -> list[str]:
    """ISO codes of every language in ``labels`` (bitext labels are ``source-target``)."""
    codes = {ISO_CODES[name] for label in labels for name in str(label).split("-") if name in ISO_CODES}
    return sorted(codes)


def _run_name(folder: Path) -> str:
    """A model folder's name for its card: the training run's (``RUN/final``; ``RUN/model/final`` under
    ``st-synth run``), not ``final``."""
    parts = folder.resolve().parts
    if folder.name in (FINAL_DIR, ADAPTER_DIR):
        parts = parts[:-1]
        if parts[-1] == RUN_MODEL_DIR and len(parts) > 1:
            parts = parts[:-1]
    return parts[-1]


def _warmup(training_args: Any) -> str:
    if training_args.warmup_steps:
        return f"{training_args.warmup_steps:g} steps"
    ratio = getattr(training_args, "warmup_ratio", None)
    return f"{ratio:g} of the steps" if ratio else "none"


def _languages_summary(report: dict[str, Any]) -> str:
    kept = report.get("kept_by_language", {})
    top = ", ".join(f"{language} {count}" for language, count in list(kept.items())[:8])
    return f"{len(kept)} ({top}{', ...' if len(kept) > 8 else ''})"


def write_dataset_card(
    folder: str | Path, dataset: DatasetDict, report: dict[str, Any], repo_id: str
) -> Path:
    """README.md for ``dataset`` in ``folder``, with its images (kinds, languages, text lengths, drops)
    under ``folder/images``."""
    from st_synth.cards.plots import dataset_images

    folder = Path(folder)
    images = dataset_images(folder, dataset, report)
    readme = folder / "README.md"
    readme.write_text(render_dataset_card(dataset, report, repo_id, images=images), encoding="utf-8")
    return readme


def render_dataset_card(
    dataset: DatasetDict, report: dict[str, Any], repo_id: str, images: list[dict[str, str]] | None = None
) -> str:
    """The dataset card (README.md) of a generated dataset: Hub metadata, how to load it, what it holds per
    kind and language, and how it was generated (the report)."""
    splits = [
        {
            "name": name,
            "paper_table": TASK_KINDS[name].paper_table if name in TASK_KINDS else "user data",
            "rows": split.num_rows,
            "columns": split.column_names,
        }
        for name, split in dataset.items()
    ]
    kept_languages = report.get("kept_by_language", {})
    summary = _languages_summary(report)
    return _template("dataset_card.md").render(
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        splits=splits,
        report=report,
        languages=language_codes(kept_languages),
        languages_summary=summary,
        size_category=_size_category(sum(s["rows"] for s in splits)),
        images=images or [],
        instructions=InstructionFormat.of(report),
    )


def _hardness(loss_args: Any) -> dict[str, Any] | None:
    """The in_batch loss's hardness weighting, for the card (None: off)."""
    mode = getattr(loss_args, "hardness_mode", "none")
    return None if mode == "none" else {"mode": mode, "strength": loss_args.hardness_strength}


def write_card_facts(
    folder: str | Path,
    *,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    generation_report: dict[str, Any],
    summary: dict[str, Any],
    loss_args: Any,
    card_metadata: dict[str, Any] | None = None,
    repo_id: str | None = None,
    evaluation: dict[str, float] | None = None,
) -> Path:
    """Save the card's facts (what training knows: recipe, data, loss, departures from the paper) beside a
    saved model, for the package stage to render README.md from (:func:`render_model_card`,
    :func:`st_synth.cards.package.package_model`) and for later updates. Returns the facts file.

    ``card_metadata`` is the Hub metadata sentence-transformers' own card data gives the trained model
    (language, license, base model, datasets, tags, widget); see :func:`st_card_metadata`."""
    folder = Path(folder)
    prompts_file = folder / "config_sentence_transformers.json"
    prompts = json.loads(prompts_file.read_text()).get("prompts", {}) if prompts_file.is_file() else {}
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    adapter = folder / "adapter_config.json"
    if not config and adapter.is_file():
        config = {"architectures": ["LoRA adapter"]}
    dimension = config.get("hidden_size", "?")
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    facts = {
        "title": (repo_id or _run_name(folder)).split("/")[-1],
        "repo_id": repo_id or str(folder),
        "base_model": model_args.base_model,
        "base_model_id": model_args.base_model if "/" in model_args.base_model else None,
        "architecture": ", ".join(config.get("architectures", [])) or "decoder",
        "dimension": dimension,
        "max_seq_length": model_args.max_seq_length,
        "instruction_template": model_args.instruction_template,
        "merged": not adapter.is_file(),
        "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                 "targets": list(model_args.lora_target_modules)},
        "loss_citations": summary.get("loss_citations", {}),
        "training": {
            "losses": list(summary.get("loss_citations", {})),
            "temperature": loss_args.temperature,
            "scale": round(1 / loss_args.temperature, 4),
            "own_negatives": [n for n in loss_args.no_in_batch_negatives if n in summary["sources"]],
            "matryoshka_dims": list(getattr(loss_args, "matryoshka_dims", [])),
            "directions": list(getattr(loss_args, "directions", ["query_to_doc"])),
            "partition_mode": getattr(loss_args, "partition_mode", "joint"),
            "hardness": _hardness(loss_args),
            "batch_size": training_args.per_device_train_batch_size,
            "world_size": summary.get("world_size", 1),
            "learning_rate": training_args.learning_rate,
            "scheduler": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
            "warmup": _warmup(training_args),
            "weight_decay": training_args.weight_decay,
            "steps": summary["global_steps"],
            "epochs": training_args.num_train_epochs,
            "train_loss": summary["train_loss"],
            "precision": precision,
            "gradient_checkpointing": bool(getattr(training_args, current_setting_name("activation_checkpointing"))),
            "sources": summary["sources"],
        },
        "synthetic": ({**generation_report, "languages": _languages_summary(generation_report)}
                      if generation_report else None),
        "languages": language_codes((generation_report or {}).get("kept_by_language", {})),
        "evaluation": evaluation or {},
        "loss_curve": [[entry["step"], entry["loss"]] for entry in summary.get("log_history", [])
                       if "loss" in entry and "step" in entry],
        "decontamination": _decontamination(summary.get("decontamination")),
        "held_out": summary.get("held_out") or {},

        "mixed_batches": bool(getattr(data_args, "mix_sources", False)),
        "modules": [m.get("type") for m in modules],
        "query_prompt": prompts.get("query", ""),
        "card_metadata": card_metadata or {},
    }  # fmt: skip
    facts["departures"] = departures(data_args, training_args, summary, facts["training"]["own_negatives"])
    (folder / CARD_DATA_FILE).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return folder / CARD_DATA_FILE


def departures(
    data_args: Any, training_args: Any, summary: dict[str, Any], own_negatives: list[str]
) -> list[dict[str, str]]:
    """The recipe's choices in effect for this model that the paper did not make (or does not state), each
    with the setting that turns it off: the card and README list them. ``own_negatives``: the sources trained
    with the own-negatives loss."""
    found = []
    if own := own_negatives:
        found.append({"choice": f"{', '.join(own)} trained against each row's own negatives only (other rows' labels "
                      "repeat, so they are not negatives)", "paper": "in-batch and hard negatives for every kind",
                      "switch": "no_in_batch_negatives: []"})  # fmt: skip
    if not getattr(data_args, "mix_sources", False):
        found.append({"choice": "one source (task kind or dataset) per batch", "paper": "not stated",
                      "switch": "mix_sources: true"})  # fmt: skip
    if summary.get("batch_sampler") == "length_grouped":  # the recipe's default sampler
        found.append({"choice": "rows of similar length batched together, no duplicate text in a batch",
                      "paper": "not stated", "switch": "batch_sampler: no_duplicates"})  # fmt: skip
    if not data_args.use_instructions:
        found.append({"choice": "trained without instructions", "paper": "an instruction on every query",
                      "switch": "use_instructions: true"})  # fmt: skip
    elif not getattr(data_args, "symmetric_instructions", True):
        found.append({"choice": "symmetric kinds instructed on the query only", "paper": "both texts instructed",
                      "switch": "symmetric_instructions: true"})  # fmt: skip
    if summary.get("decontamination"):
        found.append({"choice": "training rows that overlap an evaluation task's texts dropped before training",
                      "paper": "overlap measured after training (its Appendix B)", "switch": "decontaminate: []"})  # fmt: skip
    return found


def _decontamination(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    dropped = sum(entry.get("dropped", 0) for entry in report.get("sources", {}).values())
    return {"tasks": report.get("tasks", []), "dropped": dropped}


def render_model_card(
    folder: str | Path,
    evaluation: dict[str, float] | None = None,
    *,
    comparison: dict[str, dict[str, float]] | None = None,
    consistency_filter: dict[str, Any] | None = None,
    mining: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """(Re)render README.md (and its images) from the saved card facts, optionally with new evaluation
    results, the scores of other columns on the same tasks (other models, e.g. the untrained backbone, and
    ``variants``: this model cut or quantized, name -> ``truncate_dim`` / ``precision``, as
    ``EvaluationArguments.variants()``), the consistency filter's report and the hard-negative mining's."""
    folder = Path(folder)
    facts_path = folder / CARD_DATA_FILE
    if not facts_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CARD_DATA_FILE}; it was not trained by st-synth's recipe.")
    facts = json.loads(facts_path.read_text())
    if evaluation is not None:
        facts["evaluation"] = {**facts.get("evaluation", {}), **evaluation}
    if comparison is not None:
        facts["comparison"] = comparison
    if consistency_filter is not None:
        facts["consistency_filter"] = consistency_filter
    if mining is not None:
        facts["mining"] = mining
    if variants is not None:
        facts["variants"] = variants
    if any(given is not None for given in (evaluation, comparison, consistency_filter, mining, variants)):
        facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    readme = folder / "README.md"
    defaults = {
        "comparison": {},
        "consistency_filter": None,
        "mining": None,
        "query_prompt": True,
        "card_metadata": {},
    }
    facts = {**defaults, **facts}
    facts["storage"] = storage_rows(facts)
    from st_synth.cards.plots import model_images

    body = _template("model_card.md").render(**facts, images=model_images(folder, facts))
    metadata = hub_metadata(facts)
    readme.write_text(f"---\n{metadata.to_yaml()}\n---\n\n{body}", encoding="utf-8")
    return readme


def storage_rows(facts: dict[str, Any]) -> list[dict[str, Any]]:
    """The full embedding and each evaluated cut size / precision: dimensions, bytes per vector, mean score
    over the evaluated tasks and the share of the full float32 embedding's mean it keeps."""
    from st_synth.evaluation.evaluate import PRECISIONS

    evaluation, comparison = facts.get("evaluation") or {}, facts.get("comparison") or {}
    variants, dimension = facts.get("variants") or {}, facts.get("dimension")
    if not evaluation or not variants or not isinstance(dimension, int):
        return []

    def row(name: str, scores: dict[str, float], dims: int, precision: str) -> dict[str, Any]:
        shared = [task for task in evaluation if task in scores]
        mean = sum(scores[task] for task in shared) / len(shared)
        full = sum(evaluation[task] for task in shared) / len(shared)
        return {"name": name, "dimension": dims, "precision": precision, "bytes_per_vector": dims * PRECISIONS[precision],
                "mean": mean, "retained": mean / full if full > 0 else None}  # fmt: skip

    rows = [row("full", evaluation, dimension, "float32")]
    for name, extra in variants.items():
        if any(task in evaluation for task in comparison.get(name, {})):
            rows.append(row(name, comparison[name], extra.get("truncate_dim") or dimension,
                            extra.get("precision", "float32")))  # fmt: skip
    return rows


TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "st-synth", "e5-mistral"]


def st_card_metadata(model: Any, *, languages: list[str], license: str | None = None,
                     datasets: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The Hub metadata of sentence-transformers' own card data for a trained ``model`` (its base model,
    widget, tags, ...), with st-synth's language, license and dataset ids set on it first."""
    import yaml

    card = model.model_card_data
    if languages:
        card.set_language(languages)
    if license:
        card.set_license(license)
    card.add_tags(TAGS)
    card.datasets = list(dict.fromkeys([*(card.datasets or []), *(datasets or [])]))
    try:
        metadata = yaml.safe_load(card.to_yaml()) or {}
    except Exception as error:  # the card data is a nicety: never fail a finished training run on it
        import logging

        logging.getLogger(__name__).warning(
            "sentence-transformers' card data failed (%s); using st-synth's", error
        )
        metadata = {}
    metadata.pop("model-index", None)  # rebuilt from the mteb scores
    return metadata


def _task_metadata(task_names: list[str]) -> dict[str, Any]:
    """mteb's metadata of each named task (mteb's registry is read once); a task this mteb does not know (any
    more) is left out."""
    from st_synth.evaluation.evaluate import resolve_tasks

    try:
        return {name: task.metadata for name, task in zip(task_names, resolve_tasks(task_names), strict=True)}
    except ValueError:  # some name is unknown: look the others up one by one
        if len(task_names) == 1:
            return {}
        return {name: meta for name in task_names for meta in _task_metadata([name]).values()}


def _task_result(task_name: str, score: float, meta: Any) -> Any:
    """One mteb score as a Hub evaluation result (the way mteb's own model cards record them)."""
    from huggingface_hub import EvalResult

    if meta is not None:
        dataset = dict(meta.dataset or {})
        task_type, metric = meta.type, meta.main_score
        split = (meta.eval_splits or ["test"])[0]
        dataset_type, revision = dataset.get("path") or f"st-synth/{task_name}", dataset.get("revision")
    else:  # a task this mteb does not know (any more): keep the score, under its name
        task_type, metric, split, dataset_type, revision = "embedding", "main_score", "test", task_name, None
    return EvalResult(
        task_type=task_type, dataset_type=dataset_type, dataset_name=f"MTEB {task_name}", dataset_split=split,
        dataset_revision=revision, metric_type=metric, metric_name=metric, metric_value=round(float(score), 6),
        task_name=task_type, source_name="mteb", source_url="https://github.com/embeddings-benchmark/mteb",
    )  # fmt: skip


def hub_metadata(facts: dict[str, Any]) -> Any:
    """The card's YAML metadata: sentence-transformers' card data (as saved with the facts), completed
    with st-synth's base model, languages and tags, and the mteb scores as ``model-index`` results."""
    from huggingface_hub import ModelCardData

    metadata = dict(facts.get("card_metadata") or {})
    metadata.setdefault("library_name", "sentence-transformers")
    metadata.setdefault("pipeline_tag", "sentence-similarity")
    metadata["tags"] = list(dict.fromkeys([*(metadata.get("tags") or []), *TAGS]))
    if facts.get("base_model_id"):
        metadata.setdefault("base_model", facts["base_model_id"])
    if facts.get("languages"):
        metadata.setdefault("language", facts["languages"])
    scores = facts.get("evaluation") or {}
    metadata_of = _task_metadata(list(scores)) if scores else {}
    results = [_task_result(task, score, metadata_of.get(task)) for task, score in scores.items()]
    if results:
        metadata["eval_results"] = results
        metadata["model_name"] = facts["title"]
    return ModelCardData(**metadata)
