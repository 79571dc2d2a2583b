"""The e5-mistral training recipe on ``SentenceTransformerTrainer``: data, LoRA, losses, save, card.

Everything the recipe script (``recipes/train_mistral.py``) does lives here, so it is importable,
testable and the same under one CPU, ``accelerate launch``, ``torchrun`` or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import set_seed

from st_synth.arguments import decode_json
from st_synth.data_source import load_saved_or_hub
from st_synth.embedder import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    build_embedder,
    check_instruction_template,
    format_instruction,
)
from st_synth.lora import PAPER_TARGET_MODULES, check_target_modules, merge_lora
from st_synth.losses import LOSSES, LossArguments, build_loss
from st_synth.names import ADAPTER_DIR, FINAL_DIR, REPORT_FILE, SUMMARY_FILE, unknown_name
from st_synth.prepared import build_once, has_weights
from st_synth.sampling import LENGTH_GROUPED, SOURCE_ORDERS, LengthGroupedBatchSampler
from st_synth.speed import (
    apply_fused_kernels,
    apply_packed_sequences,
    check_fused_kernels,
    check_packed_sequences,
)
from st_synth.taxonomy import TASK_KINDS, get_kind

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("query", "positive", "negative")
# Set to a folder to have every rank record what its loss sees and a digest of its final LoRA weights:
# the way to check a multi-process setup (negatives gathered across ranks, ranks in agreement).
TRACE_ENV = "ST_SYNTH_TRACE_DIR"


@dataclass
class ModelArguments:
    base_model: str = field(
        default="smollm2-135m",
        metadata={"help": "Decoder backbone: a folder, a Hub id, 'smollm2-135m' (the packaged pretrained "
                  "SmolLM2 as Mistral) or 'tiny' (a random two-layer Mistral built in place, for smoke tests)."},
    )  # fmt: skip
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per input, EOS included."})
    instruction_template: str = field(default=DEFAULT_INSTRUCTION_TEMPLATE)
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.1)
    lora_target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    torch_dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16 weights."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa or flash_attention_2"})
    fused_kernels: str = field(
        default="auto",
        metadata={"help": "auto: Liger's RMSNorm/RoPE/SwiGLU kernels where CUDA and liger-kernel are present, "
                  "plain modules elsewhere; liger: require them; off: never."},
    )  # fmt: skip
    packed_sequences: str = field(
        default="auto",
        metadata={"help": "auto: run each batch's texts several to a row, each attending only to itself, so no "
                  "compute goes to padding (where the backbone keeps packed sequences apart, checked at start); "
                  "on: require it; off: padded batches."},
    )  # fmt: skip


@dataclass
class DataArguments:
    dataset: str = field(default="", metadata={"help": "Folder written by `st-synth generate`, or a Hub id."})
    kinds: list[str] | None = field(default=None, metadata={"help": "Train on these kinds (splits) only."})
    extra_datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "Your own labeled data as NAME=PATH_OR_HUB_ID|INSTRUCTION; its first three columns "
                  "are read as (query, positive[, negative]). PATH may be builtin:lee-background (real "
                  "half-document pairs from news gensim ships) or builtin:wiki-sections (real heading/passage "
                  "pairs from its Wikipedia sample)."},
    )  # fmt: skip
    max_examples_per_source: int | None = field(default=None)
    eval_examples: int = field(default=0, metadata={"help": "Held out per source for evaluation loss."})
    use_instructions: bool = field(
        default=True,
        metadata={"help": "Prefix queries with their task instruction (the paper). Off: plain text, and the "
                  "saved model's query prompt is empty too, so encode_query() reads texts as trained."},
    )  # fmt: skip
    decontaminate: list[str] = field(
        default_factory=list,
        metadata={"help": "mteb task names whose texts no training row may contain: a row with a text equal to "
                  "one of theirs (after normalisation) or sharing a 13-word run with one is dropped, and counted "
                  "per source (the training summary's `decontamination`)."},
    )  # fmt: skip
    hard_negatives: bool = field(
        default=True,
        metadata={"help": "Train on the generated hard negatives. Off: in-batch negatives only."},
    )
    symmetric_instructions: bool = field(
        default=True,
        metadata={"help": "Symmetric kinds (sts, bitext) put the instruction on both texts, as the paper does. "
                  "Off: on the query only, like the other kinds."},
    )  # fmt: skip
    public_datasets: str | list[Any] | None = field(
        default=None,
        metadata={"help": "Labelled datasets to mix in, the paper's way (a YAML list: name, path, split, columns, "
                  "sample_ratio, instructions, symmetric; st_synth.public_data): sampled with public_seed, each "
                  "query instructed, negatives mined where a dataset has none. recipes/configs/"
                  "e5-mistral-7b-full.yaml lists the paper's.", "flag_type": str | None, "metavar": "JSON"},
    )  # fmt: skip
    public_mining_model: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Mines negatives for public datasets without any (the paper: intfloat/multilingual-e5-base)."
        },
    )
    public_mining_query_prompt: str | None = field(
        default=None, metadata={"help": "e.g. 'query: ' for e5 models."}
    )
    public_mining_corpus_prompt: str | None = field(
        default=None, metadata={"help": "e.g. 'passage: ' for e5 models."}
    )
    public_seed: int = field(
        default=42, metadata={"help": "Draws the sampled rows and instructions of public data."}
    )
    public_cache: str | None = field(
        default=None, metadata={"help": "Prepared public data (default ~/.cache/st_synth/public)."}
    )
    mix_sources: bool = field(
        default=False,
        metadata={"help": "Train all sources as one, so that a batch mixes tasks (in-batch negatives from other "
                  "tasks, which are easy). Default off: one source per batch (the recipe's choice; the paper does "
                  "not say). The sources must have the same columns."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.public_datasets:  # a bad entry fails here, before any data or model is loaded
            from st_synth.public_data import parse_sources

            self.public_datasets = decode_json(self.public_datasets, "public_datasets")
            parse_sources(self.public_datasets)


@dataclass
class OutputArguments:
    merge: bool = field(default=True, metadata={"help": "Also save the LoRA merged into the weights."})
    hub_private: bool = field(
        default=False, metadata={"help": "Create the Hub repo (push_to_hub) as private."}
    )
    license: str | None = field(
        default=None,
        metadata={"help": "The model card's license (a Hub license id such as apache-2.0; the base model's terms "
                  "apply to the trained weights)."},
    )  # fmt: skip
    dataset_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the training data, for the card's `datasets` (e.g. the repo `st-synth "
                  "generate --push_to_hub` uploaded to). Default: --dataset when it is a Hub id."},
    )  # fmt: skip


# transformers renamed gradient_checkpointing* to activation_checkpointing* (the old names still work there,
# with a FutureWarning at every run). Settings are passed on under the names the installed release has, so
# users' files may use either spelling and older releases (the GPU image's) still get the old one.
_CHECKPOINTING_RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


@functools.cache
def _setting_renames() -> dict[str, str]:
    fields = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    if "activation_checkpointing" in fields:
        return _CHECKPOINTING_RENAMES
    return {new: old for old, new in _CHECKPOINTING_RENAMES.items()}


def current_setting_name(name: str) -> str:
    """``name`` as the installed transformers spells it (old and new checkpointing names either way)."""
    return _setting_renames().get(name, name)


def _recipe_post_init(self: Any) -> None:
    if self.batch_sampler == LENGTH_GROUPED:
        self.batch_sampler = LengthGroupedBatchSampler
    SentenceTransformerTrainingArguments.__post_init__(self)


def _recipe_training_arguments() -> type:
    """``SentenceTransformerTrainingArguments`` with the recipe's defaults (as trl's ``SFTConfig`` has its
    own): one source per batch, length-grouped batches without duplicate texts, activations recomputed,
    no reporting service. The checkpointing fields take the names the installed transformers uses."""
    fields = [
        ("output_dir", str, field(default="outputs/e5-model", metadata={"help": "Where the run saves."})),
        ("batch_sampler", str, field(
            default=LENGTH_GROUPED,
            metadata={"help": f"{LENGTH_GROUPED}: rows of similar length together (less padding), no duplicate "
                      "texts in a batch; no_duplicates: sentence-transformers' sampler without duplicates; "
                      "batch_sampler: plain (duplicate texts are false negatives).",
                      "choices": [LENGTH_GROUPED, BatchSamplers.NO_DUPLICATES.value,
                                  BatchSamplers.BATCH_SAMPLER.value]},
        )),
        ("multi_dataset_batch_sampler", str, field(
            default="proportional",
            metadata={"help": "The order of the sources' batches (each batch holds one source).",
                      "choices": list(SOURCE_ORDERS)},
        )),
        (current_setting_name("activation_checkpointing"), bool, field(
            default=True, metadata={"help": "Recompute activations in the backward pass (less memory)."},
        )),
        (current_setting_name("activation_checkpointing_kwargs"), dict | str | None, field(
            default_factory=lambda: {"use_reentrant": False},
            metadata={"help": "Checkpointing options (JSON)."},
        )),
        ("save_strategy", str, field(default="steps", metadata={
            "help": "Save a checkpoint every save_steps (steps), each epoch (epoch) or never (no); the same "
                    "command run again resumes from the last one."})),
        ("save_steps", float, field(default=100, metadata={"help": "Steps between two checkpoints."})),
        ("save_total_limit", int | None, field(default=2, metadata={"help": "Checkpoints kept (the newest)."})),
        ("report_to", list[str], field(default_factory=lambda: ["none"],
                                       metadata={"help": "Reporting integrations (none, wandb, tensorboard, ...)."})),
        ("logging_steps", float, field(default=5, metadata={"help": "Log every N steps."})),
    ]  # fmt: skip
    namespace = {
        "__module__": __name__,
        "__doc__": "sentence-transformers' training arguments with the recipe's defaults. "
        "``activation_checkpointing_kwargs`` given as JSON becomes a dict, as ``gradient_checkpointing_kwargs`` "
        "does (sentence-transformers' list of such fields predates the rename).",
        "_VALID_DICT_FIELDS": list(dict.fromkeys([*SentenceTransformerTrainingArguments._VALID_DICT_FIELDS,
                                                  current_setting_name("activation_checkpointing_kwargs")])),
        "__post_init__": _recipe_post_init,
    }  # fmt: skip
    return dataclasses.make_dataclass(
        "RecipeTrainingArguments", fields, bases=(SentenceTransformerTrainingArguments,), namespace=namespace
    )


RecipeTrainingArguments = _recipe_training_arguments()
TRAIN_DATACLASSES = (ModelArguments, DataArguments, LossArguments, OutputArguments, RecipeTrainingArguments)


def make_train_parser() -> Any:
    """The parser of ``st-synth train`` and ``recipes/train_mistral.py`` (one definition, trl's pattern)."""
    from st_synth.arguments import SettingsParser

    description = ("Train an e5-style embedder: LoRA on a decoder LLM, InfoNCE over in-batch and hard negatives. "
                   "Give --config FILE.yaml (or the file first; its keys are these flags' names), then flags to "
                   "override it.")  # fmt: skip
    return SettingsParser(TRAIN_DATACLASSES, description=description)


def run_recipe(argv: list[str]) -> dict[str, Any]:
    """``[CONFIG.yaml] [flags]`` -> train; what ``st-synth train`` and ``recipes/train_mistral.py`` run."""
    from st_synth.arguments import with_yaml

    parser = make_train_parser()
    model_args, data_args, loss_args, output_args, training_args = parser.parse_args_into_dataclasses(
        args=with_yaml(parser, list(argv))
    )
    summary = train(model_args, data_args, training_args, output_args, loss_args)
    if training_args.process_index == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "log_history"}, indent=2, default=str))
    return summary


def checkpoint_to_resume(training_args: Any) -> str | None:
    """The checkpoint a run goes on from: ``resume_from_checkpoint`` when it names a folder; else (unset or
    ``true``) the last ``checkpoint-N`` under the output folder, if any, so that the same command run again
    after a kill resumes; ``false`` starts over."""
    from transformers.trainer_utils import get_last_checkpoint

    wanted = training_args.resume_from_checkpoint
    if isinstance(wanted, str) and wanted.lower() == "false":
        return None
    if wanted is not None and str(wanted).lower() != "true":
        if not Path(wanted).is_dir():
            raise ValueError(f"resume_from_checkpoint {wanted} is not a folder; give a checkpoint-N folder, true "
                             "(the last one under output_dir) or false.")  # fmt: skip
        return str(wanted)
    output = Path(training_args.output_dir)
    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if last is None and wanted is not None:
        raise ValueError(f"resume_from_checkpoint true, but {output} holds no checkpoint-N folder.")
    if last is not None:
        logger.warning("Resuming from %s (step %s); pass --resume_from_checkpoint false to start over.", last,
                       last.rsplit("-", 1)[-1])  # fmt: skip
    return last


def resolve_base_model(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn the recipe's shortcuts into a model folder; anything else is passed on unchanged."""
    if name == "smollm2-135m":
        from st_synth.embedder import smollm2_as_mistral

        return str(smollm2_as_mistral())
    if name == "tiny":
        from st_synth.testing.tiny import build_tiny_mistral

        folder = Path(cache_dir or Path.home() / ".cache" / "st_synth") / "tiny-mistral"
        return str(build_once(folder, lambda into: build_tiny_mistral(into, "none"), complete=has_weights))
    return name


def _load_any(path_or_id: str) -> Dataset | DatasetDict:
    if path_or_id.startswith("builtin:"):
        from st_synth.offline_tasks import BUILTIN_TRAINING_SOURCES

        name = path_or_id.removeprefix("builtin:")
        if name not in BUILTIN_TRAINING_SOURCES:
            raise unknown_name("builtin source", name, BUILTIN_TRAINING_SOURCES)
        return BUILTIN_TRAINING_SOURCES[name]()
    return load_saved_or_hub(path_or_id, "Training data")


# What load_sources' report holds beside the generated dataset's own report (its generation_report.json).
SOURCE_REPORTS = ("public_data", "decontamination")


def load_sources(data: DataArguments, instruction_template: str) -> tuple[DatasetDict, dict[str, Any]]:
    """The training sources (one split each), instructions applied, plus the synthetic generation report
    with the public data's and decontamination's reports under :data:`SOURCE_REPORTS`.

    Refuses, before any model is loaded: a missing dataset, unknown kinds, missing columns, empty splits.
    """
    check_instruction_template(instruction_template)
    sources: dict[str, Dataset] = {}
    report: dict[str, Any] = {}
    clean = _decontaminator(data.decontaminate)
    if data.dataset:
        synthetic = _load_any(data.dataset)
        if not isinstance(synthetic, DatasetDict):
            raise ValueError(
                f"{data.dataset} holds one split; `st-synth generate` writes one split per kind."
            )
        report_path = Path(data.dataset) / REPORT_FILE
        if report_path.is_file():
            report = json.loads(report_path.read_text())
        wanted = data.kinds or list(synthetic)
        for kind in wanted:
            get_kind(kind)
        absent = [kind for kind in wanted if kind not in synthetic]
        if absent:
            raise ValueError(f"Kinds {absent} are not in {data.dataset}; it has: {', '.join(synthetic)}.")
        for kind in wanted:
            _refuse_empty(kind, synthetic[kind])
            sources[kind] = _prepare_synthetic(
                clean(kind, synthetic[kind]), kind, instruction_template, data.use_instructions,
                data.symmetric_instructions,
            )  # fmt: skip
    for spec in data.extra_datasets:
        name, dataset = _prepare_extra(spec, instruction_template, data.use_instructions, clean)
        sources[name] = dataset
    if data.public_datasets:
        for name, (dataset, symmetric) in _public_sources(data, report).items():
            if name in sources:
                raise ValueError(
                    f"Public dataset {name!r} has the name of another training source; rename it."
                )
            sources[name] = _instructed(clean(name, dataset), name, instruction_template, data.use_instructions,
                                        symmetric and data.symmetric_instructions)  # fmt: skip
    if not data.hard_negatives:
        sources = {name: ds.remove_columns([c for c in ds.column_names if c == "negative"])
                   for name, ds in sources.items()}  # fmt: skip
    if not sources:
        raise ValueError(
            "No training data: pass --dataset (a `st-synth generate` folder) or --extra_datasets."
        )
    for name, dataset in sources.items():
        _refuse_empty(name, dataset)
        if data.max_examples_per_source:
            sources[name] = dataset.select(range(min(dataset.num_rows, data.max_examples_per_source)))
    if data.decontaminate:
        report = {**report, "decontamination": {"tasks": list(data.decontaminate), "sources": clean.report}}
    if data.mix_sources:
        sources = {MIXED_SOURCE: _mixed(sources)}
    return DatasetDict(sources), report


MIXED_SOURCE = "mixed"


def _public_sources(data: DataArguments, report: dict[str, Any]) -> dict[str, tuple[Dataset, bool]]:
    """The public datasets (``public_datasets``), prepared or read from their cache; their report goes in
    ``report["public_data"]``. Name -> (rows with an instruction column, symmetric)."""
    from st_synth.mining import MiningArguments
    from st_synth.public_data import parse_sources, prepare_public

    specs = parse_sources(data.public_datasets)
    mining = MiningArguments(mining_model=data.public_mining_model, query_prompt=data.public_mining_query_prompt,
                             corpus_prompt=data.public_mining_corpus_prompt)  # fmt: skip
    cache = Path(data.public_cache) if data.public_cache else Path.home() / ".cache" / "st_synth" / "public"
    prepared, report["public_data"] = prepare_public(specs, data.public_seed, mining, cache)
    symmetric = {spec.name: spec.symmetric for spec in specs}
    return {name: (prepared[name], symmetric[name]) for name in prepared}


def _mixed(sources: dict[str, Dataset]) -> Dataset:
    """All sources as one dataset (``mix_sources``): they must have the same columns."""
    columns = {name: tuple(ds.column_names) for name, ds in sources.items()}
    if len(set(columns.values())) > 1:
        listed = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in columns.items())
        raise ValueError(
            f"mix_sources needs sources with the same columns, and these differ ({listed}). Drop the negatives "
            "(--hard_negatives false) or train on sources of one shape (--kinds)."
        )
    return concatenate_datasets(list(sources.values()))


def _decontaminator(tasks: list[str]) -> Any:
    """A function (name, raw dataset) -> the dataset without rows overlapping the texts of ``tasks``, that
    counts what it dropped in its ``report`` (the identity when no task is named)."""
    from st_synth.decontamination import Decontaminator, evaluation_texts

    checker = Decontaminator(evaluation_texts(tasks)) if tasks else None

    def clean(name: str, dataset: Dataset) -> Dataset:
        if checker is None:
            return dataset
        kept, report = checker.apply(DatasetDict({name: dataset}))
        clean.report[name] = report["sources"][name]
        return kept[name]

    clean.report = {}
    return clean


def _refuse_empty(name: str, dataset: Dataset) -> None:
    if dataset.num_rows == 0:
        raise ValueError(f"Training source {name!r} is empty; drop it or generate examples of that kind.")


def _prepare_synthetic(split: Dataset, kind: str, template: str, use_instructions: bool = True,
                       symmetric_instructions: bool = True) -> Dataset:  # fmt: skip
    symmetric = TASK_KINDS[kind].symmetric and symmetric_instructions
    return _instructed(split, kind, template, use_instructions, symmetric)


def _instructed(split: Dataset, name: str, template: str, use_instructions: bool, symmetric: bool) -> Dataset:
    """Rows with an ``instruction`` column -> text columns only, the instruction in ``template`` before the
    query (and before every text where ``symmetric``)."""
    needed = ["instruction", "query", "positive"]
    missing = [column for column in needed if column not in split.column_names]
    if missing:
        raise ValueError(f"Split {name!r} lacks columns {missing}; it has {split.column_names}.")
    texts = [column for column in TEXT_COLUMNS if column in split.column_names]

    def instruct(row: dict[str, str]) -> dict[str, str]:
        prefix = format_instruction(row["instruction"], template) if use_instructions else ""
        # The paper: queries get the instruction; for symmetric tasks both sides do.
        return {
            column: (prefix + row[column] if column == "query" or symmetric else row[column])
            for column in texts
        }

    return split.map(instruct, remove_columns=[c for c in split.column_names if c not in texts])


def _prepare_extra(spec: str, template: str, use_instructions: bool = True,
                   clean: Any = None) -> tuple[str, Dataset]:  # fmt: skip
    name, sep, rest = spec.partition("=")
    path, bar, instruction = rest.partition("|")
    if not sep or not bar or not name.strip() or not path.strip() or not instruction.strip():
        raise ValueError(f"Extra dataset {spec!r} must look like NAME=PATH_OR_HUB_ID|INSTRUCTION.")
    dataset = _load_any(path.strip())
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} has no 'train' split; it has: {', '.join(dataset)}.")
        dataset = dataset["train"]
    columns = dataset.column_names
    if len(columns) < 2:
        raise ValueError(f"{path} needs at least (query, positive) columns; it has {columns}.")
    kept = columns[:3]
    dataset = dataset.select_columns(kept).rename_columns(dict(zip(kept, TEXT_COLUMNS, strict=False)))
    if clean is not None:
        dataset = clean(name.strip(), dataset)
    if not use_instructions:
        return name.strip(), dataset
    prefix = format_instruction(instruction, template)
    return name.strip(), dataset.map(lambda row: {"query": prefix + row["query"]})


def build_losses(model: SentenceTransformer, sources: DatasetDict, settings: LossArguments,
                 hard_negatives: bool = True) -> dict[str, Any]:  # fmt: skip
    """One loss per source, from the registry (``st_synth.losses.LOSSES``): ``settings.loss``, or the
    own-negatives loss for sources whose in-batch negatives are false negatives."""
    losses = {}
    for name, dataset in sources.items():
        loss_name = settings.loss_name(name)
        if not LOSSES[loss_name].in_batch_negatives and "negative" not in dataset.column_names:
            if hard_negatives:
                raise ValueError(
                    f"Source {name!r} has in-batch negatives switched off but no hard negatives to learn from; "
                    "remove it from --no_in_batch_negatives."
                )
            logger.warning("Source %r trains on in-batch negatives: hard negatives are off.", name)
            loss_name = "in_batch"
        losses[name] = build_loss(loss_name, model, settings)
    return losses


def build_model(model_args: ModelArguments, cache_dir: str | Path | None = None) -> SentenceTransformer:
    import torch
    from peft import LoraConfig

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    check_fused_kernels(model_args.fused_kernels)  # before the backbone loads
    check_packed_sequences(model_args.packed_sequences)
    if model_args.torch_dtype not in dtypes:
        raise ValueError(
            f"torch_dtype {model_args.torch_dtype!r} is unknown; choose one of: {', '.join(dtypes)}."
        )
    model_kwargs: dict[str, Any] = {"dtype": dtypes[model_args.torch_dtype]}
    if model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    model = build_embedder(
        resolve_base_model(model_args.base_model, cache_dir),
        max_seq_length=model_args.max_seq_length,
        instruction_template=model_args.instruction_template,
        model_kwargs=model_kwargs,
    )
    check_target_modules(model, model_args.lora_target_modules)
    # Before the adapter: Liger patches the backbone's own modules; LoRA then wraps its linear layers.
    model.fused_kernels = apply_fused_kernels(
        model[0].auto_model, model_args.fused_kernels, str(model.device)
    )
    model.packed_sequences = apply_packed_sequences(model[0], model_args.packed_sequences)
    model.add_adapter(
        LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=list(model_args.lora_target_modules),
        )
    )
    return model


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: SentenceTransformerTrainingArguments,
    output_args: OutputArguments | None = None,
    loss_args: LossArguments | None = None,
) -> dict[str, Any]:
    """Train, save the adapter and the merged model, write the card; return the training summary."""
    output_args = output_args or OutputArguments()
    loss_args = loss_args or LossArguments()
    # Validate the checkpoint to resume from and the data before loading a multi-GB backbone.
    resume = checkpoint_to_resume(training_args)
    sources, generation_report = load_sources(data_args, model_args.instruction_template)
    # What stays is the generation report alone (empty where no generated dataset is trained on), which the
    # card shows as the synthetic data; the other reports go in the summary.
    source_reports = {key: generation_report.pop(key, None) for key in SOURCE_REPORTS}
    if training_args.batch_sampler not in (BatchSamplers.NO_DUPLICATES, LengthGroupedBatchSampler):
        logger.warning(
            "batch_sampler=%s lets duplicate texts into a batch (false negatives).",
            training_args.batch_sampler,
        )
    if training_args.multi_dataset_batch_sampler not in (
        MultiDatasetBatchSamplers.PROPORTIONAL, MultiDatasetBatchSamplers.ROUND_ROBIN,
    ):  # fmt: skip
        raise ValueError(
            "Batches must hold one source at a time: use the proportional or round_robin sampler."
        )
    repo_id = training_args.hub_model_id if training_args.push_to_hub else None
    training_args.push_to_hub = False  # we push once, at the end, the merged model with its card
    eval_sources = None
    if data_args.eval_examples:
        split = {name: ds.train_test_split(test_size=data_args.eval_examples, seed=training_args.seed)
                 for name, ds in sources.items()}  # fmt: skip
        sources = DatasetDict({name: parts["train"] for name, parts in split.items()})
        eval_sources = DatasetDict({name: parts["test"] for name, parts in split.items()})

    cache_dir = Path(training_args.output_dir).parent
    # A shortcut's backbone is converted on first use: by the main process while the others wait (its
    # save_pretrained is the one that writes under torch.distributed), under a file lock against other jobs,
    # and before seeding, so that the conversion's own randomness never shifts the LoRA initialisation.
    with training_args.main_process_first(local=False, desc="preparing the backbone"):
        resolve_base_model(model_args.base_model, cache_dir)
    # The trainer seeds only after the model exists: seed first, so the LoRA weights start the same in every
    # run of the same seed (whatever the number of processes).
    set_seed(training_args.seed)
    model = build_model(model_args, cache_dir=cache_dir)
    if not data_args.use_instructions:
        # Trained on plain text: the saved query prompt must not add an instruction the model never saw.
        model.prompts = {name: "" for name in model.prompts}
    losses = build_losses(model, sources, loss_args, data_args.hard_negatives)
    trainer = RecipeTrainer(
        model=model, args=training_args, train_dataset=sources, eval_dataset=eval_sources, loss=losses
    )
    if trace_dir := os.environ.get(TRACE_ENV):
        _install_trace(Path(trace_dir), model, losses, trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    output = Path(training_args.output_dir)
    summary = {
        "base_model": model_args.base_model,
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "sources": {name: ds.num_rows for name, ds in sources.items()},
        "steps_per_source": dict(trainer.source_steps),
        "world_size": training_args.world_size,
        "fused_kernels": getattr(model, "fused_kernels", "off"),
        "packed_sequences": getattr(model, "packed_sequences", "off"),
        "batch_sampler": LENGTH_GROUPED
        if training_args.batch_sampler is LengthGroupedBatchSampler
        else str(getattr(training_args.batch_sampler, "value", training_args.batch_sampler)),
        "loss": {name: type(loss).__name__ for name, loss in losses.items()},
        **source_reports,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        from st_synth.cards import write_model_card

        adapter_dir, final_dir = output / ADAPTER_DIR, output / FINAL_DIR
        model.save_pretrained(str(adapter_dir))
        if output_args.merge:
            merge_lora(model)
            model.save_pretrained(str(final_dir))
        target = final_dir if output_args.merge else adapter_dir
        from st_synth.cards import language_codes, st_card_metadata

        dataset_id = output_args.dataset_id or (
            data_args.dataset if data_args.dataset and not Path(data_args.dataset).exists() else None
        )
        card_metadata = st_card_metadata(
            model, languages=language_codes(generation_report.get("kept_by_language", {})),
            license=output_args.license, datasets=[dataset_id] if dataset_id else None,
        )  # fmt: skip
        card_info = {
            "model_args": model_args, "data_args": data_args, "training_args": training_args, "loss_args": loss_args,
            "generation_report": generation_report, "summary": summary, "card_metadata": card_metadata,
        }  # fmt: skip
        (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        for folder in {adapter_dir, target}:
            write_model_card(folder, **card_info, repo_id=repo_id)
        if repo_id:
            from st_synth.hub import push_model

            summary["pushed"] = push_model(target, repo_id, private=output_args.hub_private or None)
    return summary


class RecipeTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` whose batches keep every rank on the same source at every step.

    Each source's batch sampler forms global batches (per-device size x processes) and
    :class:`~st_synth.sampling.SourceAlignedBatchSampler` deals each one out as equal per-rank parts, so
    all ranks run the same loss over the same columns (the same collectives: no hang) and gathered in-batch
    negatives come from one task. With one process it is sentence-transformers' proportional or round-robin
    order over whole batches. The source of every training step is logged and counted.

    Under DDP sentence-transformers forces ``dataloader_drop_last`` (its guard against an uneven last batch,
    which hangs); here a source's last global batch is dealt out evenly instead, so nothing is dropped but
    a remainder of fewer rows than processes. Dropping every short batch would lose whole small sources
    (classification data, whose batches stay small because rows must not share labels).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source_steps: dict[str, int] = {}
        self.batch_plan: list[tuple[str, int]] = []
        self.step_trace: Any = None  # set by ST_SYNTH_TRACE_DIR: called with each training step's source

    def get_batch_sampler(
        self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0
    ):
        return super().get_batch_sampler(
            dataset, batch_size * self.accelerator.num_processes, False,
            valid_label_columns=valid_label_columns, generator=generator, seed=seed,
        )  # fmt: skip

    def get_multi_dataset_batch_sampler(self, dataset, batch_samplers, generator=None, seed=0):
        from st_synth.sampling import SourceAlignedBatchSampler

        if self.accelerator.split_batches or self.accelerator.dispatch_batches:
            raise ValueError(
                "accelerator_config split_batches / dispatch_batches would cut batches across sources; "
                "the recipe deals one source's global batch to all ranks itself: leave both off."
            )
        named = {**dict(self.eval_dataset or {}), **dict(self.train_dataset or {})}
        names = [next(name for name, ds in named.items() if ds is sub) for sub in dataset.datasets]
        sampler = SourceAlignedBatchSampler(
            dataset, batch_samplers, generator=generator, seed=seed, names=names,
            world_size=self.accelerator.num_processes,
            order=MultiDatasetBatchSamplers(self.args.multi_dataset_batch_sampler).value,
        )  # fmt: skip
        if all(
            sub is self.train_dataset.get(name) for sub, name in zip(dataset.datasets, names, strict=True)
        ):
            self.batch_plan = sampler.plan()
            counts = Counter(name for name, _ in self.batch_plan)
            logger.info("Batch plan: %d steps per epoch over %d process(es); steps per source: %s",
                        len(self.batch_plan), self.accelerator.num_processes, dict(counts))  # fmt: skip
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and (source := inputs.get("dataset_name")):
            self.source_steps[source] = self.source_steps.get(source, 0) + 1
            logger.info("step %d: source %s", self.state.global_step + 1, source)
            if self.step_trace:
                rows = next(len(v) for k, v in inputs.items() if k.endswith("input_ids"))
                self.step_trace({"step": self.state.global_step + 1, "source": source, "rows": rows})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _install_trace(folder: Path, model: SentenceTransformer, losses: dict[str, Any], trainer: Any) -> None:
    import hashlib

    from transformers import TrainerCallback

    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    trace = folder / f"rank{rank}.jsonl"

    def record(entry: dict[str, Any]) -> None:
        with trace.open("a") as handle:
            handle.write(json.dumps({"rank": rank, **entry}) + "\n")

    for name, loss in losses.items():
        similarity = getattr(loss, "similarity_fct", None)
        if similarity is None:
            continue

        def traced(queries, candidates, _name=name, _similarity=similarity):
            record({"source": _name, "queries": queries.shape[0], "candidates": candidates.shape[0]})
            return _similarity(queries, candidates)

        loss.similarity_fct = traced

    trainer.step_trace = record

    class Digest(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            digest = hashlib.sha256()
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    digest.update(param.detach().float().cpu().numpy().tobytes())
            record({"lora_digest": digest.hexdigest(), "steps": state.global_step})

    trainer.add_callback(Digest())
