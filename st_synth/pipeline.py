"""``st-synth run --config FILE``: generate -> filter -> train -> evaluate -> card (-> push), one command.

The YAML file has one section per stage (see ``recipes/configs/local-smollm2.yaml``)::

    output: outputs/local-run
    generate: {local: true, num_examples: 200, languages: English, ...}   # GenerationConfig fields
    filter: {enabled: true, guide_model: all-MiniLM-L6-v2, top_k: 3}     # ConsistencyFilter fields
    train: {base_model: smollm2-135m, max_seq_length: 128, ...}           # the recipe's fields
    evaluate: {tasks: [LeeDocSTS, ...], baseline: true, reference: all-MiniLM-L6-v2}
    push_to_hub: null                                                     # or you/repo

Every section is checked before anything starts (unknown keys and values name the valid choices). Each
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

import yaml

logger = logging.getLogger(__name__)

SECTIONS = ("output", "generate", "filter", "train", "evaluate", "push_to_hub", "private")
RUN_FILE = "st_synth_run.json"
DEFAULT_TASKS = ["LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"]
EVALUATE_KEYS = {"tasks": DEFAULT_TASKS, "baseline": True, "reference": "all-MiniLM-L6-v2",
                 "instructions": True, "batch_size": 16, "max_seq_length": 128}  # fmt: skip
GENERATE_EXTRA_KEYS = {"local": False, "llm_threads": 1, "llm_backend": "auto"}


def _check_keys(section: str, given: dict[str, Any], valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in section {section!r}; valid keys: {', '.join(sorted(valid))}."
        )


@dataclasses.dataclass
class RunPlan:
    """A validated run: everything is parsed and checked, nothing has started."""

    output: Path
    generation: Any  # GenerationConfig
    local: bool
    llm_threads: int
    llm_backend: str  # resolved: llama.cpp or transformers (meaningful where local)
    llm_backend_choice: str  # as configured (auto may fall back to transformers at start-up)
    generation_given: frozenset[str]  # the generate keys the config sets (they win over backend limits)
    consistency: Any  # ConsistencyFilter or None
    train_settings: dict[str, Any]
    model_args: Any
    data_args: Any
    training_args: Any
    tasks: list[str]
    evaluate: dict[str, Any]
    push_to_hub: str | None
    private: bool

    @property
    def final_model(self) -> Path:
        """Where the recipe saves the merged model."""
        return Path(self.training_args.output_dir) / "final"

    @property
    def stages(self) -> list[str]:
        return ["generate", "filter" if self.consistency else None, "train", "evaluate", "package"]


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Run config {path} does not exist; e.g. recipes/configs/local-smollm2.yaml.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping with sections {', '.join(SECTIONS)}.")
    for section, values in (overrides or {}).items():
        config[section] = {**(config.get(section) or {}), **values}
    return config


def plan_run(config: dict[str, Any]) -> RunPlan:
    """Check every section of a run config; raise ValueError naming the problem and the valid choices."""
    from transformers import HfArgumentParser

    from st_synth.builder import GenerationConfig
    from st_synth.evaluation import resolve_tasks
    from st_synth.filtering import ConsistencyFilter
    from st_synth.local_llm import SMOLLM2_ALIAS, backend_generation_defaults, resolve_backend
    from st_synth.training import (
        DataArguments,
        ModelArguments,
        RecipeTrainingArguments,
        current_setting_name,
        settings_to_flags,
    )

    _check_keys("top level", config, list(SECTIONS))
    output = Path(config.get("output") or "outputs/run")

    generate = dict(config.get("generate") or {})
    gen_fields = [f.name for f in dataclasses.fields(GenerationConfig) if f.init]
    _check_keys("generate", generate, gen_fields + list(GENERATE_EXTRA_KEYS))
    given = frozenset(generate)
    local = bool(generate.pop("local", False))
    llm_threads = int(generate.pop("llm_threads", 1))
    llm_backend = str(generate.pop("llm_backend", "auto"))
    if local and generate.get("base_url"):
        raise ValueError("generate.local starts its own endpoint; drop generate.base_url or generate.local.")
    if local:
        for key, value in backend_generation_defaults(llm_backend).items():
            generate.setdefault(key, value)
        generate.setdefault("model", SMOLLM2_ALIAS)
        generate["base_url"] = "http://127.0.0.1:1/v1"  # the real port is known once the server starts
    generation = GenerationConfig(**generate)
    if not local:
        generation.validate_endpoint_settings()

    filter_section = config.get("filter")
    consistency = None
    if filter_section not in (None, False):
        filter_section = dict(filter_section or {})
        _check_keys(
            "filter", filter_section, ["enabled"] + [f.name for f in dataclasses.fields(ConsistencyFilter)]
        )
        if filter_section.pop("enabled", True):
            consistency = ConsistencyFilter(**filter_section)

    train = {current_setting_name(key): value for key, value in (config.get("train") or {}).items()}
    if "dataset" in train or "output_dir" in train:
        raise ValueError(
            "train.dataset and train.output_dir are set by the run (under `output`); remove them."
        )
    settings = {
        **_training_defaults(),
        **train,
        "dataset": str(output / "data"),
        "output_dir": str(output / "model"),
    }
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeTrainingArguments))
    known = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc)}
    _check_keys("train", train, sorted(known - {"dataset", "output_dir"}))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=settings_to_flags(settings)
    )

    evaluate = dict(config.get("evaluate") or {})
    _check_keys("evaluate", evaluate, list(EVALUATE_KEYS))
    evaluate = {**EVALUATE_KEYS, **evaluate}
    tasks = list(evaluate["tasks"])
    resolve_tasks(tasks)  # unknown names fail now, with close matches
    return RunPlan(
        output=output, generation=generation, local=local, llm_threads=llm_threads, consistency=consistency,
        llm_backend=resolve_backend(llm_backend) if local else llm_backend, llm_backend_choice=llm_backend,
        generation_given=given,
        train_settings=settings, model_args=model_args, data_args=data_args, training_args=training_args,
        tasks=tasks, evaluate=evaluate, push_to_hub=config.get("push_to_hub"),
        private=bool(config.get("private", False)),
    )  # fmt: skip


def _training_defaults() -> dict[str, Any]:
    """The recipe's defaults (as in ``default_training_arguments``) for a run that saves once, at the end."""
    return {"batch_sampler": "no_duplicates", "multi_dataset_batch_sampler": "proportional",
            "activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False},
            "save_strategy": "no", "report_to": "none", "logging_steps": 5, "dataloader_num_workers": 0}  # fmt: skip


def _fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def dataset_fingerprint(folder: str | Path) -> str:
    """A digest of a saved DatasetDict's rows (not of file names or times)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    digest = hashlib.sha256()
    for name in sorted(dataset):
        digest.update(name.encode())
        for batch in dataset[name].iter(batch_size=1024):
            digest.update(json.dumps(batch, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class _Stages:
    def __init__(self, plan: RunPlan, echo) -> None:
        self.plan, self.echo = plan, echo
        self.names = [name for name in plan.stages if name]
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, int] = {}

    def start(self, name: str, detail: str) -> float:
        self.echo(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: {detail}")
        return time.perf_counter()

    def done(self, name: str, started: float, detail: str) -> None:
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.peak_rss_mb[name] = peak_rss_mb()
        self.echo(
            f"      {detail} ({self.timings[name]:.0f} s, peak memory so far {self.peak_rss_mb[name]} MB)"
        )


def peak_rss_mb() -> int:
    """The largest resident size this process has had so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024))


def run(plan: RunPlan, echo=print) -> dict[str, Any]:
    """Execute a validated plan; return (and write to ``output/run_summary.json``) what it did."""
    plan.output.mkdir(parents=True, exist_ok=True)
    stages = _Stages(plan, echo)
    summary: dict[str, Any] = {"output": str(plan.output)}

    summary["generation"] = _generate(plan, stages)
    summary["filter"] = _filter(plan, stages)
    summary["training"] = _train(plan, stages)
    summary["evaluation"] = _evaluate(plan, stages, summary["training"]["fingerprint"])
    summary["card"] = _package(plan, stages, summary)
    summary["timings_s"] = stages.timings
    summary["peak_rss_mb"] = stages.peak_rss_mb
    (plan.output / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    echo(score_table(summary["evaluation"]))
    return summary


def _generate(plan: RunPlan, stages: _Stages) -> dict[str, Any]:
    from st_synth.builder import SyntheticDatasetBuilder, generation_report_summary
    from st_synth.cache import AnswerCache
    from st_synth.local_llm import LocalLLMServer, serving

    g = plan.generation
    started = stages.start("generate", f"{g.num_examples} examples from {g.model}"
                           + (f" (local {plan.llm_backend} server)" if plan.local else f" at {g.public_settings()['base_url']}"))  # fmt: skip
    AnswerCache.check(g.cache_path)  # a file that is no cache is refused before a server starts
    if plan.local:
        server = LocalLLMServer(backend=plan.llm_backend_choice, threads=plan.llm_threads)
        with serving(g, server, plan.generation_given) as (config, running):
            builder = SyntheticDatasetBuilder(config, health_check=running.check_alive,
                                              report_extra={"local_server": running.describe()})  # fmt: skip
            builder.build()
        if running.fallback_from:
            stages.echo(
                f"      served by transformers serve: llama.cpp failed its warm-up ({running.fallback_reason})"
            )
    else:
        builder = SyntheticDatasetBuilder(g)
        builder.build()
    builder.save(plan.output / "synthetic")
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

    from st_synth.filtering import filter_folder

    source, target = plan.output / "synthetic", plan.output / "data"
    if target.exists():
        shutil.rmtree(target)
    if plan.consistency is None:
        shutil.copytree(source, target)
        return None
    started = stages.start("filter", f"consistency check with {plan.consistency.guide_model}")
    report = filter_folder(source, target, plan.consistency)
    per_kind = ", ".join(f"{kind} {entry['kept']}/{entry['rows']}" for kind, entry in report["kinds"].items())
    stages.done("filter", started, f"kept {report['kept']} of {report['rows']}: {per_kind}")
    return report


def _train(plan: RunPlan, stages: _Stages) -> dict[str, Any]:
    from st_synth.training import train

    final = plan.final_model
    fingerprint = _fingerprint(plan.train_settings | {"dataset": dataset_fingerprint(plan.output / "data")})
    marker = final / RUN_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        started = stages.start("train", "data and settings unchanged: reusing the trained model")
        previous = json.loads(marker.read_text())
        stages.done("train", started, f"{final}")
        return previous
    base = plan.model_args.base_model
    started = stages.start("train", f"LoRA r{plan.model_args.lora_r} on {base}, "
                           f"{plan.training_args.num_train_epochs:g} epoch(s)")  # fmt: skip
    result = train(plan.model_args, plan.data_args, plan.training_args)
    record = {"fingerprint": fingerprint, "train_loss": result["train_loss"], "global_steps": result["global_steps"],
              "sources": result["sources"], "model": str(final)}  # fmt: skip
    marker.write_text(json.dumps(record, indent=2) + "\n")
    stages.done(
        "train", started, f"{result['global_steps']} steps, loss {result['train_loss']:.4f} -> {final}"
    )
    return record


def _evaluate_cached(
    name: str, fingerprint: str, plan: RunPlan, load_model, echo, instructions: bool | None = None
) -> dict[str, float]:
    from st_synth.evaluation import evaluate, resolve_tasks

    folder = plan.output / "eval"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    instructions = plan.evaluate["instructions"] if instructions is None else instructions
    key = _fingerprint(fingerprint, plan.tasks, instructions, plan.evaluate["max_seq_length"])
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            echo(f"      {name}: unchanged, scores from {path}")
            return saved["summary"]["main_score"]
    model = load_model()
    model.max_seq_length = min(model.max_seq_length or plan.evaluate["max_seq_length"],
                               plan.evaluate["max_seq_length"])  # fmt: skip
    payload = evaluate(model, resolve_tasks(plan.tasks), use_instructions=instructions,
                       batch_size=plan.evaluate["batch_size"])  # fmt: skip
    payload["fingerprint"] = key
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    scores = payload["summary"]["main_score"]
    echo(f"      {name}: " + ", ".join(f"{task} {score:.4f}" for task, score in scores.items())
         + f" ({payload['summary']['wall_time_s']:.0f} s)")  # fmt: skip
    return scores


def _evaluate(plan: RunPlan, stages: _Stages, trained_fingerprint: str) -> dict[str, dict[str, float]]:
    from sentence_transformers import SentenceTransformer

    from st_synth.embedder import build_embedder
    from st_synth.filtering import resolve_guide
    from st_synth.training import resolve_base_model

    started = stages.start("evaluate", ", ".join(plan.tasks))
    results: dict[str, dict[str, float]] = {}
    base = plan.model_args.base_model
    if plan.evaluate["baseline"]:
        results["untrained"] = _evaluate_cached(
            "untrained", _fingerprint(base, plan.model_args.instruction_template), plan,
            lambda: build_embedder(resolve_base_model(base, Path(plan.training_args.output_dir).parent),
                                   max_seq_length=plan.evaluate["max_seq_length"],
                                   instruction_template=plan.model_args.instruction_template),
            stages.echo,
        )  # fmt: skip
    final = plan.final_model
    results["trained"] = _evaluate_cached("trained", trained_fingerprint, plan,
                                          lambda: SentenceTransformer(str(final)), stages.echo)  # fmt: skip
    if plan.evaluate["reference"]:
        reference = plan.evaluate["reference"]
        # A plain sentence encoder, not instruction-tuned: it reads the texts as they are.
        results[reference] = _evaluate_cached("reference", reference, plan,
                                              lambda: SentenceTransformer(resolve_guide(reference)), stages.echo,
                                              instructions=False)  # fmt: skip
    stages.done("evaluate", started, f"results under {plan.output / 'eval'}")
    return results


def _package(plan: RunPlan, stages: _Stages, summary: dict[str, Any]) -> str:
    from st_synth.cards import render_model_card

    final = plan.final_model
    started = stages.start("package", f"model card in {final}")
    evaluation = summary["evaluation"]
    comparison = {name: scores for name, scores in evaluation.items() if name != "trained"}
    readme = render_model_card(final, evaluation=evaluation["trained"], comparison=comparison,
                               consistency_filter=summary["filter"])  # fmt: skip
    detail = f"{readme}"
    if plan.push_to_hub:
        from st_synth.hub import push_model

        detail += f"; pushed to {push_model(final, plan.push_to_hub, private=plan.private or None)}"
    stages.done("package", started, detail)
    return str(readme)


def score_table(evaluation: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per task, one column per evaluated model (+ trained minus untrained)."""
    models = list(evaluation)
    tasks = list(dict.fromkeys(task for scores in evaluation.values() for task in scores))
    with_delta = "trained" in evaluation and "untrained" in evaluation
    header = "| task | " + " | ".join(models) + (" | trained - untrained |" if with_delta else " |")
    lines = [header, "|---" * (len(models) + 1 + with_delta) + "|"]
    for task in tasks:
        cells = [f"{evaluation[m][task]:.4f}" if task in evaluation[m] else "" for m in models]
        if with_delta:
            cells.append(f"{evaluation['trained'][task] - evaluation['untrained'][task]:+.4f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
