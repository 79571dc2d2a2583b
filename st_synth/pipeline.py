"""``st-synth run --config FILE``: generate -> filter -> mine -> train -> evaluate -> card (-> push), one command.

The YAML file has one section per stage (see ``recipes/configs/local-smollm2.yaml``)::

    output: outputs/local-run
    generate: {local: true, num_examples: 200, languages: English, ...}   # GenerationConfig fields
    filter: {enabled: true, guide_model: all-MiniLM-L6-v2, top_k: 3}     # ConsistencyFilter fields
    mine: {enabled: true, range_max: 30}                                  # MiningArguments
    train: {base_model: smollm2-135m, max_seq_length: 128, ...}           # the recipe's fields
    evaluate: {tasks: [LeeDocSTS, ...], baseline: true, reference: all-MiniLM-L6-v2}
    push_to_hub: null                                                     # or you/repo
    push_dataset_to_hub: null                                             # or you/data (the training data)

Training is decontaminated against the evaluated tasks unless ``train.decontaminate`` says otherwise (``[]``:
off). Every section is checked before anything starts (unknown keys and values name the valid choices). Each
stage leaves its result under ``output``; a re-run reuses what is still valid: generation answers come
from the answer cache, training is skipped when its data and settings are unchanged (a fingerprint), and
evaluations are kept per model fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

from st_synth.common.arguments import SettingsError, SettingsParser, yaml_settings
from st_synth.common.memory import peak_rss_mb, release_memory
from st_synth.common.names import (
    ADAPTER_DIR,
    FINAL_DIR,
    RUN_DATA_DIR,
    RUN_EMBEDDINGS_DIR,
    RUN_EVAL_DIR,
    RUN_FILE,
    RUN_MODEL_DIR,
    RUN_SUMMARY_FILE,
    RUN_SYNTHETIC_DIR,
)
from st_synth.common.prepared import fingerprint as run_fingerprint
from st_synth.data.examples import METADATA
from st_synth.data.filtering import ConsistencyFilter
from st_synth.data.mining import MiningArguments
from st_synth.data.reader import load_saved
from st_synth.evaluation.evaluate import EvaluationArguments, resolve_tasks, score_table
from st_synth.generation.config import GenerationConfig
from st_synth.model.embedder import check_instruction_template
from st_synth.training.arguments import DataArguments, ModelArguments, OutputArguments
from st_synth.training.losses import LossArguments

__all__ = ["RunArguments", "RunPlan", "load_config", "plan_run", "run", "score_table"]

logger = logging.getLogger(__name__)

# Set by the run itself (under `output`), so not keys of its `train` section.
RUN_SET_TRAIN_KEYS = ("dataset", "output_dir")


@dataclasses.dataclass
class RunArguments:
    """The top level of an ``st-synth run`` YAML file (also ``st-synth run --output/--push_to_hub/--private/
    --push_dataset_to_hub``)."""

    output: str = dataclasses.field(default="outputs/run", metadata={"help": "The run's folder."})
    push_to_hub: str | None = dataclasses.field(
        default=None, metadata={"help": "Push the trained model, with its card, to this Hub repo."}
    )
    private: bool = dataclasses.field(default=False, metadata={"help": "Create the Hub repo as private."})
    push_dataset_to_hub: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Push the training data (the run's data/: filtered, mined) with its dataset card to this "
                  "Hub dataset repo, after training; the model card's `datasets` names it."},
    )  # fmt: skip


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunArguments))
SECTIONS = (*RUN_KEYS, "generate", "filter", "mine", "train", "evaluate")


@dataclasses.dataclass
class RunPlan:
    """A validated run: every section parsed into its stage dataclass and checked, nothing started."""

    run: RunArguments
    generation: GenerationConfig
    consistency: ConsistencyFilter | None
    mining: MiningArguments | None
    model_args: ModelArguments
    data_args: DataArguments
    loss_args: LossArguments
    output_args: OutputArguments
    training_args: SentenceTransformerTrainingArguments  # RecipeTrainingArguments
    evaluation: EvaluationArguments
    train_settings: dict[str, Any]  # the train section as given (with the run's folders): its fingerprint
    tasks: list[str]  # the evaluation's mteb task names, resolved
    _corpus: Any = dataclasses.field(default=None, repr=False)

    @property
    def output(self) -> Path:
        return Path(self.run.output)

    @property
    def local(self) -> bool:
        return self.generation.local

    @property
    def final_model(self) -> Path:
        """Where the recipe saves the merged model."""
        return Path(self.training_args.output_dir) / FINAL_DIR

    @property
    def stages(self) -> list[str]:
        return [name for name in ("generate", "filter" if self.consistency else None,
                                  "mine" if self.mining else None, "train", "evaluate", "package") if name]  # fmt: skip

    def corpus(self) -> Any:
        """The corpus generation is grounded in (loaded once), or None."""
        if not self.generation.corpus:
            return None
        if self._corpus is None:
            from st_synth.data.corpus import Corpus

            self._corpus = Corpus.load(self.generation)
        return self._corpus

    def passages(self) -> list[str] | None:
        return self.corpus().passages if self.generation.corpus else None


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``st-synth run --set SECTION.KEY=VALUE`` items as {section: {key: value}} (values read as YAML)."""
    import yaml

    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run config ``path`` (YAML) with ``overrides`` ({section: {key: value}}, as ``--set`` gives them)
    merged into its sections; a file that cannot be read as such a mapping fails naming the sections.
    :func:`plan_run` then checks every section."""
    config = yaml_settings(path, "Run config", "recipes/configs/local-smollm2.yaml",
                           holds=f"with sections {', '.join(SECTIONS)}")  # fmt: skip
    for section, values in (overrides or {}).items():
        config[section] = {**(config.get(section) or {}), **values}
    return config


def plan_run(config: dict[str, Any]) -> RunPlan:
    """Check every section of a run config through the parser of its stage (the same flags the
    subcommands take); raise ValueError naming the problem and the valid choices."""
    from st_synth.training.arguments import make_train_parser

    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise SettingsError(
            f"Unknown key(s) {unknown} in section 'top level'; valid keys: {', '.join(SECTIONS)}."
        )
    (run,) = SettingsParser([RunArguments]).parse_settings(
        {key: config[key] for key in RUN_KEYS if key in config}, "top level"
    )
    (generation,) = SettingsParser([GenerationConfig]).parse_settings(
        config.get("generate") or {}, "generate"
    )
    generation.validate_endpoint_settings()

    consistency = None
    filter_section = config.get("filter")
    if filter_section not in (None, False):
        filter_section = dict(filter_section or {})
        if filter_section.pop("enabled", True):
            (consistency,) = SettingsParser([ConsistencyFilter]).parse_settings(filter_section, "filter")
    mining = None
    mine_section = config.get("mine")
    if mine_section not in (None, False):
        mine_section = dict(mine_section or {})
        if mine_section.pop("enabled", True):
            (mining,) = SettingsParser([MiningArguments]).parse_settings(mine_section, "mine")

    train = dict(config.get("train") or {})
    if any(key in train for key in RUN_SET_TRAIN_KEYS):
        raise ValueError(
            "train.dataset and train.output_dir are set by the run (under `output`); remove them."
        )
    output = Path(run.output)
    (evaluation,) = SettingsParser([EvaluationArguments]).parse_settings(
        config.get("evaluate") or {}, "evaluate"
    )
    tasks = [
        task.metadata.name for task in evaluation.resolve()
    ]  # unknown names fail now, with close matches
    # No text of an evaluated task is trained on: decontamination against them, unless the file says otherwise.
    settings = {"decontaminate": tasks, **train, "dataset": str(output / RUN_DATA_DIR),
                "output_dir": str(output / RUN_MODEL_DIR)}  # fmt: skip
    if (
        run.push_dataset_to_hub and "dataset_id" not in train
    ):  # the model card names the data it was trained on
        settings["dataset_id"] = run.push_dataset_to_hub
    model_args, data_args, loss_args, output_args, training_args = make_train_parser().parse_settings(
        settings, "train"
    )
    # The saved data carries the instructions as the run trains with them, unless `generate` says otherwise.
    section = config.get("generate") or {}
    if "instruction_template" not in section:  # refused here when bad, not after the generation is paid for
        generation.instruction_template = check_instruction_template(model_args.instruction_template)
    if "instructions" not in section:
        symmetric = "e5" if data_args.symmetric_instructions else "anchor"
        generation.instructions = symmetric if data_args.use_instructions else "none"
    return RunPlan(
        run=run, generation=generation, consistency=consistency, mining=mining, model_args=model_args, data_args=data_args,
        loss_args=loss_args, output_args=output_args, training_args=training_args, evaluation=evaluation,
        train_settings=settings, tasks=tasks,
    )  # fmt: skip


def dataset_fingerprint(folder: str | Path) -> str:
    """A digest of a saved DatasetDict's rows, and of its ``metadata/`` beside it where there is one (training
    reads the instructions there), not of file names or times."""
    digest = hashlib.sha256()
    for part in (Path(folder), Path(folder) / METADATA):
        if part.is_dir():
            dataset = load_saved(part)
            for name in sorted(dataset):
                digest.update(name.encode())
                for batch in dataset[name].iter(batch_size=1024):
                    digest.update(json.dumps(batch, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class _Stages:
    def __init__(self, plan: RunPlan, echo) -> None:
        self.plan, self.echo = plan, echo
        self.names = plan.stages
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, int] = {}

    def start(self, name: str, detail: str) -> float:
        self.echo(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: {detail}")
        return time.perf_counter()

    def done(self, name: str, started: float, detail: str) -> None:
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.peak_rss_mb[name] = peak_rss_mb()
        release_memory()  # what the stage freed goes back to the system, so the next one starts from it
        self.echo(
            f"      {detail} ({self.timings[name]:.0f} s, peak memory so far {self.peak_rss_mb[name]} MB)"
        )


def run(plan: RunPlan, echo=print) -> dict[str, Any]:
    """Execute a validated plan; return (and write to ``output/run_summary.json``) what it did."""
    plan.output.mkdir(parents=True, exist_ok=True)
    stages = _Stages(plan, echo)
    summary: dict[str, Any] = {"output": str(plan.output)}

    summary["generation"] = _generate(plan, stages)
    summary["filter"] = _filter(plan, stages)
    summary["mining"] = _mine(plan, stages)
    summary["training"] = _train(plan, stages)
    summary["evaluation"] = _evaluate(plan, stages, summary["training"]["fingerprint"])
    summary["card"] = _package(plan, stages, summary)
    summary["timings_s"] = stages.timings
    summary["peak_rss_mb"] = stages.peak_rss_mb
    (plan.output / RUN_SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    echo(score_table(summary["evaluation"]))
    return summary


def _generate(plan: RunPlan, stages: _Stages) -> dict[str, Any]:
    from st_synth.generation.local_llm import resolve_backend
    from st_synth.generation.stage import generate, generation_report_summary

    g = plan.generation
    where = (f" (local {resolve_backend(g.llm_backend)} server)" if g.local
             else f" at {g.public_settings()['base_url']}")  # fmt: skip
    started = stages.start("generate", f"{g.num_examples} examples from {g.model}{where}")
    builder = generate(g, plan.output / RUN_SYNTHETIC_DIR, corpus=plan.corpus())
    if builder.server is not None and builder.server.fallback_from:
        stages.echo(
            f"      served by transformers serve: llama.cpp failed its warm-up ({builder.server.fallback_reason})"
        )
    report = builder.report or {}
    stages.done("generate", started, generation_report_summary(report).replace("\n", "\n      "))
    if not report.get("complete"):
        logger.warning("Generation stopped early (%s); training on the %d kept examples.",
                       report.get("stop_reason"), report.get("num_examples_kept", 0))  # fmt: skip
    keys = (
        "num_examples_kept",
        "requests_sent",
        "cache_hits",
        "kept_by_kind",
        "drops",
        "complete",
        "wall_time_s",
    )
    return {key: report.get(key) for key in keys}


def _filter(plan: RunPlan, stages: _Stages) -> dict[str, Any] | None:
    import shutil

    from st_synth.data.filtering import filter_folder

    source, target = plan.output / RUN_SYNTHETIC_DIR, plan.output / RUN_DATA_DIR
    if target.exists():
        shutil.rmtree(target)
    if plan.consistency is None:
        shutil.copytree(source, target)
        return None
    started = stages.start("filter", f"consistency check with {plan.consistency.guide_model}")
    report = filter_folder(source, target, plan.consistency, passages=plan.passages(),
                           cache_folder=plan.output / RUN_EMBEDDINGS_DIR)  # fmt: skip
    per_kind = ", ".join(f"{kind} {entry['kept']}/{entry['rows']}" for kind, entry in report["kinds"].items())
    stages.done("filter", started, f"kept {report['kept']} of {report['rows']}: {per_kind}")
    return report


def _mine(plan: RunPlan, stages: _Stages) -> dict[str, Any] | None:
    """Hard negatives for the filtered data (in place): over the corpus of grounded generation, else among the
    data's own positives (``st_synth.data.mining.mine_folder``)."""
    if plan.mining is None:
        return None
    import shutil

    from st_synth.data.mining import mine_folder

    folder = plan.output / RUN_DATA_DIR
    where = "the corpus" if plan.generation.corpus else "the data's own positives"
    started = stages.start("mine", f"hard negatives among {where} with {plan.mining.mining_model}")
    staging = folder.with_name(folder.name + ".mined")
    if staging.exists():
        shutil.rmtree(staging)
    report = mine_folder(folder, staging, plan.mining, plan.generation, loaded=plan.corpus(),
                         cache_folder=plan.output / RUN_EMBEDDINGS_DIR)  # fmt: skip
    shutil.rmtree(folder)
    staging.rename(folder)
    kept = ", ".join(f"{kind} {entry['kept']}/{entry['rows']}" for kind, entry in report["splits"].items())
    stages.done("mine", started, kept or "nothing to mine")
    return report


def _train(plan: RunPlan, stages: _Stages) -> dict[str, Any]:
    from st_synth.training.sources import load_sources
    from st_synth.training.trainer import train

    final = plan.final_model
    fingerprint = run_fingerprint(
        plan.train_settings | {"dataset": dataset_fingerprint(plan.output / RUN_DATA_DIR)}
    )
    marker = final / RUN_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        started = stages.start("train", "data and settings unchanged: reusing the trained model")
        previous = json.loads(marker.read_text())
        stages.done("train", started, f"{final}")
        return previous
    base = plan.model_args.base_model
    started = stages.start("train", f"LoRA r{plan.model_args.lora_r} on {base}, "
                           f"{plan.training_args.num_train_epochs:g} epoch(s)")  # fmt: skip
    own_checkpoints(Path(plan.training_args.output_dir), fingerprint)
    # The data stage (decontamination against the evaluated tasks, public data, instructions), then training.
    prepared = load_sources(plan.data_args, plan.model_args.instruction_template)
    result = train(
        plan.model_args,
        plan.data_args,
        plan.training_args,
        plan.output_args,
        plan.loss_args,
        sources=prepared,
        package=False,
    )
    record = {"fingerprint": fingerprint, "train_loss": result["train_loss"], "global_steps": result["global_steps"],
              "sources": result["sources"], "decontamination": result.get("decontamination"),
              "model": str(final), "hub_model_id": result.get("hub_model_id")}  # fmt: skip
    marker.write_text(json.dumps(record, indent=2) + "\n")
    stages.done(
        "train", started, f"{result['global_steps']} steps, loss {result['train_loss']:.4f} -> {final}"
    )
    return record


CHECKPOINTS_FILE = "checkpoints_fingerprint.json"


def own_checkpoints(output_dir: Path, fingerprint: str) -> None:
    """Keep the checkpoints under ``output_dir`` only if this training (its data and settings, ``fingerprint``)
    wrote them, so that a killed run resumes from its own last checkpoint and never from another training's:
    those are removed, and the folder is marked as this training's."""
    import shutil

    mark = output_dir / CHECKPOINTS_FILE
    mine = mark.is_file() and json.loads(mark.read_text()).get("fingerprint") == fingerprint
    stale = [] if mine else sorted(output_dir.glob("checkpoint-*"))
    for folder in stale:
        logger.warning("Removing %s: another training's checkpoint (other data or settings).", folder)
        shutil.rmtree(folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def _evaluate(plan: RunPlan, stages: _Stages, trained_fingerprint: str) -> dict[str, dict[str, float]]:
    from st_synth.evaluation.stage import evaluate_models

    started = stages.start("evaluate", ", ".join(plan.tasks))
    result = evaluate_models(
        plan.evaluation, plan.final_model, tasks=resolve_tasks(plan.tasks), base_model=plan.model_args.base_model,
        instruction_template=plan.model_args.instruction_template, cache_dir=Path(plan.training_args.output_dir).parent,
        results_dir=plan.output / RUN_EVAL_DIR, model_fingerprint=trained_fingerprint,
        echo=lambda line: stages.echo(f"      {line}"),
    )  # fmt: skip
    stages.done("evaluate", started, f"results under {plan.output / RUN_EVAL_DIR}")
    return result.scores


def _push_training_data(plan: RunPlan, stages: _Stages) -> str:
    """Push the data the run trained on (its data/ folder) to ``push_dataset_to_hub``; return the commit URL."""
    from st_synth.cards.hub import push_dataset_folder

    repo_id = plan.run.push_dataset_to_hub
    url = push_dataset_folder(plan.output / RUN_DATA_DIR, repo_id, private=plan.run.private or None)
    stages.echo(f"      training data pushed to {repo_id}: {url}")
    return url


def _package(plan: RunPlan, stages: _Stages, summary: dict[str, Any]) -> str:
    from st_synth.cards.package import package_model

    final = plan.final_model
    started = stages.start("package", f"model card in {final}")
    evaluation = summary["evaluation"]
    comparison = {name: scores for name, scores in evaluation.items() if name != "trained"}
    if plan.run.push_dataset_to_hub:
        _push_training_data(plan, stages)
    # One push: to run.push_to_hub, or to the train section's hub_model_id where that asked for a push.
    repo_id = plan.run.push_to_hub or summary["training"].get("hub_model_id")
    packaged = package_model(final, also=[final.parent / ADAPTER_DIR], repo_id=repo_id,
                             private=plan.run.private or plan.output_args.hub_private or None,
                             evaluation=evaluation["trained"], comparison=comparison,
                             consistency_filter=summary["filter"], mining=summary["mining"],
                             variants=plan.evaluation.variants())  # fmt: skip
    detail = packaged["card"] + (f"; pushed to {packaged['pushed']}" if packaged["pushed"] else "")
    stages.done("package", started, detail)
    return packaged["card"]
