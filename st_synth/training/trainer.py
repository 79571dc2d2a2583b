"""The e5-mistral training recipe on ``SentenceTransformerTrainer``: data, LoRA, losses, save, card.

Everything the recipe script (``recipes/train_mistral.py``) does lives here, so it is importable,
testable and the same under one CPU, ``accelerate launch``, ``torchrun`` or DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import set_seed

from st_synth.cards.package import package_model
from st_synth.cards.render import language_codes, st_card_metadata, write_card_facts
from st_synth.common.arguments import with_yaml
from st_synth.common.names import ADAPTER_DIR, FINAL_DIR, SUMMARY_FILE
from st_synth.evaluation.held_out import held_out_evaluator, held_out_scores
from st_synth.model.backbones import resolve_base_model
from st_synth.model.embedder import (
    build_embedder,
)
from st_synth.model.lora import check_target_modules, merge_lora
from st_synth.training.arguments import (
    DataArguments,
    ModelArguments,
    OutputArguments,
    make_train_parser,
)
from st_synth.training.losses import LOSSES, LossArguments, build_loss, loss_citations
from st_synth.training.sampling import LENGTH_GROUPED, LengthGroupedBatchSampler, SourceAlignedBatchSampler
from st_synth.training.sources import SOURCE_REPORTS, load_sources
from st_synth.training.speed import (
    apply_fused_kernels,
    apply_packed_sequences,
    check_fused_kernels,
    check_packed_sequences,
)

logger = logging.getLogger(__name__)

# Set to a folder to have every rank record what its loss sees and a digest of its final LoRA weights:
# the way to check a multi-process setup (negatives gathered across ranks, ranks in agreement).
TRACE_ENV = "ST_SYNTH_TRACE_DIR"


def run_recipe(argv: list[str]) -> dict[str, Any]:
    """``[CONFIG.yaml] [flags]`` -> train; what ``st-synth train`` and ``recipes/train_mistral.py`` run."""
    parser = make_train_parser()
    model_args, data_args, loss_args, output_args, training_args = parser.parse_args_into_dataclasses(
        args=with_yaml(parser, list(argv))
    )
    checkpoint_to_resume(training_args)  # a bad checkpoint fails before the data stage runs
    prepared = load_sources(data_args, model_args.instruction_template)
    summary = train(model_args, data_args, training_args, output_args, loss_args, sources=prepared)
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


def build_losses(model: SentenceTransformer, sources: DatasetDict, settings: LossArguments,
                 hard_negatives: bool = True) -> dict[str, Any]:  # fmt: skip
    """One loss per source, from the registry (``st_synth.training.losses.LOSSES``): ``settings.loss``, or the
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
    """The embedder the recipe trains: the backbone as a sentence-transformers model (last-token pooling, EOS
    guaranteed, instruction prompts) with LoRA adapters from ``model_args`` and the speed options (packed
    sequences, fused kernels) where they apply."""
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
    *,
    sources: tuple[DatasetDict, dict[str, Any]] | None = None,
    package: bool = True,
) -> dict[str, Any]:
    """Train, save the adapter and the merged model and the card's facts; return the training summary.

    Training only trains: the data comes prepared (decontaminated, public data mixed in, instructions applied)
    by the data stage, :func:`~st_synth.training.sources.load_sources`.

    Args:
        model_args, data_args, training_args, output_args, loss_args: the recipe's settings
            (:mod:`st_synth.training.arguments`); of ``data_args`` training reads ``eval_examples``,
            ``use_instructions``, ``hard_negatives`` and, for the card, ``dataset``.
        sources: what :func:`~st_synth.training.sources.load_sources` returned for ``data_args`` (the
            sources, the reports). None: it is called here, for callers of this function alone.
        package: also run the package stage (:func:`~st_synth.cards.package.package_model`): render the card
            and push to ``hub_model_id`` when ``push_to_hub``. ``st-synth run`` passes False and packages once,
            after evaluation.
    """
    output_args = output_args or OutputArguments()
    loss_args = loss_args or LossArguments()
    # Validate the checkpoint to resume from and the data before loading a multi-GB backbone.
    resume = checkpoint_to_resume(training_args)
    sources, generation_report = sources or load_sources(data_args, model_args.instruction_template)
    generation_report = dict(generation_report)
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
    evaluator = held_out_evaluator(eval_sources) if eval_sources is not None else None
    trainer = RecipeTrainer(model=model, args=training_args, train_dataset=sources, eval_dataset=eval_sources,
                            loss=losses, evaluator=evaluator)  # fmt: skip
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
        "loss_citations": loss_citations(losses),
        **source_reports,
        "log_history": trainer.state.log_history,
    }
    if evaluator is not None and trainer.is_world_process_zero():
        summary["held_out"] = held_out_scores(evaluator(model))
        logger.info("Held-out nDCG@10 per source: %s", summary["held_out"])
    if trainer.is_world_process_zero():
        adapter_dir, final_dir = output / ADAPTER_DIR, output / FINAL_DIR
        model.save_pretrained(str(adapter_dir))
        if output_args.merge:
            merge_lora(model)
            model.save_pretrained(str(final_dir))
        target = final_dir if output_args.merge else adapter_dir
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
            write_card_facts(folder, **card_info, repo_id=repo_id)
        summary["model"] = str(target)
        summary["hub_model_id"] = repo_id
        if package:
            packaged = package_model(target, also=[adapter_dir], repo_id=repo_id,
                                     private=output_args.hub_private or None)  # fmt: skip
            if packaged["pushed"]:
                summary["pushed"] = packaged["pushed"]
    return summary


class RecipeTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` whose batches keep every rank on the same source at every step.

    Each source's batch sampler forms global batches (per-device size x processes) and
    :class:`~st_synth.training.sampling.SourceAlignedBatchSampler` deals each one out as equal per-rank parts, so
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
            logger.info("Batch plan: %d steps per epoch over %d process(es); steps per source: %s%s",
                        len(self.batch_plan), self.accelerator.num_processes, dict(counts),
                        f"; skipped (nothing to contrast): {sampler.skipped}" if sampler.skipped else "")  # fmt: skip
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
