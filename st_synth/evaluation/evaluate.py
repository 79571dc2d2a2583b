"""Evaluation with mteb 2.x, each task encoded with its own instruction, the way the paper evaluated.

Two protocols (``PROTOCOLS``); they differ only where the authors' scripts (microsoft/unilm, ``e5/``:
``mteb_beir_eval.py`` for retrieval, ``mteb_except_retrieval_eval.py`` for the rest) differ from st-synth's:

* ``e5`` (the authors'): retrieval instructs queries only; every other task type, reranking included,
  embeds all its texts with the instruction; classification embeddings are not L2-normalised.
* ``st-synth``: retrieval and reranking instruct queries only (a reranking candidate is a document);
  every embedding is normalised as the model normalises it.

``auto`` (the default) takes ``e5`` for an e5-style model (an st-synth embedder, or a model whose prompts
begin with ``Instruct:``) and ``st-synth`` for any other. Instructions come from ``overrides``, else the
registry (:func:`st_synth.evaluation.instructions.get_instruction`, by task name, then by task type); the results say
which of the three each task's came from. They are given per call, so custom tasks mteb does not know get theirs.
Embeddings are cached within a run: mteb re-encodes repeated texts (an STS set of 50 documents asks for
thousands of encodes), and the cache turns that into 50.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from st_synth.common.names import unknown_name
from st_synth.common.text import name_list
from st_synth.data.guide import load_guide
from st_synth.evaluation.instructions import get_instruction, has_instruction
from st_synth.model.backbones import resolve_base_model
from st_synth.model.embedder import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    build_embedder,
    format_instruction,
    instruction_template_of,
)

logger = logging.getLogger(__name__)

# The tasks that ship with st-synth and need no network (real data from PyPI packages).
DEFAULT_TASKS = ["LeeDocSTS", "MiniNewsgroupsClassification", "ChatterbotQARetrieval"]
PROTOCOLS = ("auto", "e5", "st-synth")
# Task types whose documents are embedded without the instruction, per protocol.
QUERY_ONLY_TYPES = {
    "st-synth": {"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"},
    "e5": {"Retrieval", "InstructionRetrieval"},
}
# Task types embedded without L2 normalisation, per protocol (the authors: "slightly better results").
UNNORMALIZED_TYPES = {"st-synth": set(), "e5": {"Classification"}}


# Embedding precisions (sentence-transformers' quantize_embeddings) and their bytes per dimension.
PRECISIONS = {"float32": 4.0, "int8": 1.0, "uint8": 1.0, "binary": 0.125, "ubinary": 0.125}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise unknown_name("embedding precision", precision, PRECISIONS)
    return precision


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of the evaluation protocols (``auto``, ``e5``, ``st-synth``), else a ValueError."""
    if protocol not in PROTOCOLS:
        raise unknown_name("evaluation protocol", protocol, PROTOCOLS)
    return protocol


@contextmanager
def _without_normalize(model: SentenceTransformer) -> Iterator[None]:
    """The model without its final ``Normalize`` module while the block runs (restored after)."""
    name, last = next(reversed(model._modules.items()))
    if type(last).__name__ != "Normalize":
        yield
        return
    del model._modules[name]
    try:
        yield
    finally:
        model._modules[name] = last


def _abs_encoder():
    from mteb.models.abs_encoder import AbsEncoder

    return AbsEncoder


class InstructedEncoder(_abs_encoder()):
    """An mteb encoder around a SentenceTransformer that applies per-task instructions."""

    def __init__(
        self,
        model: SentenceTransformer,
        overrides: dict[str, str] | None = None,
        *,
        use_instructions: bool = True,
        batch_size: int = 32,
        protocol: str = "auto",
        precision: str = "float32",
    ) -> None:
        self.model = model
        self.precision = check_precision(precision)
        self._ranges: dict[str, np.ndarray] = {}  # int8/uint8 calibration per task
        self.overrides = dict(overrides or {})
        self.use_instructions = use_instructions
        self.batch_size = batch_size
        self.calls: list[dict[str, Any]] = []  # what was encoded how: for reports and tests
        try:  # an st-synth embedder's prompts are instructions in its template; other models get them as is
            self.template: str | None = instruction_template_of(model)
        except ValueError:
            self.template = None
        # e5-style models from elsewhere (e5-mistral-7b-instruct's own prompts) read the paper's template.
        e5_style = self.template is not None or any(
            str(prompt).startswith("Instruct:") for prompt in (getattr(model, "prompts", None) or {}).values()
        )
        if e5_style and self.template is None:
            self.template = DEFAULT_INSTRUCTION_TEMPLATE
        check_protocol(protocol)
        self.protocol = protocol if protocol != "auto" else ("e5" if e5_style else "st-synth")
        self.instruction_sources: dict[str, str] = {}
        self._cache: dict[tuple[str | None, bool, str], np.ndarray] = {}

    def instruction_for(self, task_name: str, task_type: str | None) -> str | None:
        if not self.use_instructions:
            return None
        if task_name in self.overrides:
            self.instruction_sources[task_name] = "override"
            return self.overrides[task_name]
        self.instruction_sources[task_name] = "task" if has_instruction(task_name) else f"{task_type} default"
        return get_instruction(task_name, task_type)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instruction_for(task_metadata.name, task_metadata.type)
        is_document = getattr(prompt_type, "value", prompt_type) == "document"
        if task_metadata.type in QUERY_ONLY_TYPES[self.protocol] and is_document:
            instruction = None
        normalized = task_metadata.type not in UNNORMALIZED_TYPES[self.protocol]
        missing = list(dict.fromkeys(t for t in texts if (instruction, normalized, t) not in self._cache))
        if missing:
            prompt = (
                format_instruction(instruction, self.template)
                if instruction and self.template
                else instruction
            )
            with nullcontext() if normalized else _without_normalize(self.model):
                vectors = self.model.encode(
                    missing, prompt=prompt, batch_size=self.batch_size, convert_to_numpy=True,
                    show_progress_bar=False,
                )  # fmt: skip
            self._cache.update(
                {(instruction, normalized, t): v for t, v in zip(missing, vectors, strict=True)}
            )
        self.calls.append({"task": task_metadata.name, "side": "document" if is_document else "query",
                           "instruction": instruction, "normalized": normalized, "texts": len(texts),
                           "encoded": len(missing)})  # fmt: skip
        return self._quantized(
            task_metadata.name, np.stack([self._cache[(instruction, normalized, t)] for t in texts])
        )

    def _quantized(self, task: str, embeddings: np.ndarray) -> np.ndarray:
        """``embeddings`` at ``self.precision`` (sentence-transformers' ``quantize_embeddings``), as floats mteb
        can compare: int8/uint8 codes, calibrated per task on the first texts it encodes (mteb indexes a
        retrieval corpus before its queries, so there: the corpus); binary/ubinary as +1/-1 per bit (cosine on
        them ranks like the Hamming distance of the packed bits)."""
        if self.precision == "float32":
            return embeddings
        from sentence_transformers.util.quantization import quantize_embeddings

        if self.precision in ("int8", "uint8"):
            ranges = self._ranges.setdefault(
                task, np.vstack([embeddings.min(axis=0), embeddings.max(axis=0)])
            )
            return quantize_embeddings(embeddings, self.precision, ranges=ranges).astype(np.float32)
        bits = np.unpackbits(quantize_embeddings(embeddings, "ubinary"), axis=1)[:, : embeddings.shape[1]]
        return bits.astype(np.float32) * 2 - 1


OFFLINE_BENCHMARK = "st-synth-offline"
"""The shipped real tasks (no network): ``--benchmark st-synth-offline``."""


def resolve_benchmark(name: str) -> list[Any]:
    """The tasks of an mteb benchmark (or of ``st-synth-offline``); unknown names get close matches."""
    import mteb

    from st_synth.data.offline_tasks import OFFLINE_TASKS

    if name == OFFLINE_BENCHMARK:
        return resolve_tasks(list(OFFLINE_TASKS))
    known = [benchmark.name for benchmark in mteb.get_benchmarks()] + [OFFLINE_BENCHMARK]
    if name not in known:
        raise unknown_name("benchmark", name, known, list_choices=False, cutoff=0.4,
                           extra=f"{OFFLINE_BENCHMARK!r} needs no network.")  # fmt: skip
    return list(mteb.get_benchmark(name).tasks)


def load_task_data(tasks: list[Any]) -> None:
    """Load every task's data before any model is loaded, so that unreachable data fails early and plainly."""
    from st_synth.data.offline_tasks import OFFLINE_TASKS

    for task in tasks:
        if getattr(task, "data_loaded", False):
            continue
        try:
            task.load_data()
        except (ConnectionError, OSError) as error:
            source = (getattr(task.metadata, "dataset", None) or {}).get("path", "the Hugging Face Hub")
            raise ValueError(
                f"The data of task {task.metadata.name!r} cannot be reached: mteb downloads it from "
                f"{source!r} on the Hub, and this machine cannot get it ({type(error).__name__}). "
                f"Run where the Hub is reachable, or evaluate on the tasks that ship with st-synth and need "
                f"no network: {', '.join(OFFLINE_TASKS)} (--benchmark {OFFLINE_BENCHMARK})."
            ) from error


def resolve_tasks(names: list[str]) -> list[Any]:
    """mteb task objects for ``names`` (st-synth's offline tasks first); unknown names get close matches."""
    import mteb

    from st_synth.data.offline_tasks import DOMAIN_TASKS, OFFLINE_TASKS

    known: dict[str, Any] = {task.metadata.name: task for task in mteb.get_tasks()}
    known.update({name: task_class() for name, task_class in {**OFFLINE_TASKS, **DOMAIN_TASKS}.items()})
    for name in names:
        if name not in known:
            raise unknown_name("mteb task", name, known, list_choices=False)
    return [known[name] for name in names]


def evaluate(
    model: SentenceTransformer | str,
    tasks: list[Any],
    *,
    overrides: dict[str, str] | None = None,
    use_instructions: bool = True,
    output: str | Path | None = None,
    batch_size: int = 32,
    max_seq_length: int | None = None,
    protocol: str = "auto",
    truncate_dim: int | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Run mteb on ``tasks``; return (and write to ``output``) mteb's results plus a compact summary.
    ``max_seq_length`` truncates inputs (at most the model's own limit); ``protocol``: see the module;
    ``truncate_dim``: embeddings cut to their first D dimensions (a Matryoshka-trained model's)."""
    check_protocol(protocol)
    import mteb

    load_task_data(tasks)
    if isinstance(model, str):
        try:
            model = SentenceTransformer(model)
        except Exception as error:  # any loading failure reads the same to the user
            raise ValueError(f"Cannot load a SentenceTransformer from {model!r}: {error}") from error
    if max_seq_length:
        model.max_seq_length = min(model.max_seq_length or max_seq_length, max_seq_length)
    full = model.get_embedding_dimension()
    if truncate_dim is not None and not 0 < truncate_dim <= (full or truncate_dim):
        raise ValueError(f"truncate_dim must be in 1..{full} (the model's dimensions), got {truncate_dim}")
    model.truncate_dim = truncate_dim
    encoder = InstructedEncoder(
        model,
        overrides,
        use_instructions=use_instructions,
        batch_size=batch_size,
        protocol=protocol,
        precision=precision,
    )
    started = time.perf_counter()
    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=True,
                           encode_kwargs={"batch_size": batch_size})  # fmt: skip
    scores = {task.task_name: float(task.get_score()) for task in result.task_results}
    payload = {
        "summary": {"main_score": scores, "mean": float(np.mean(list(scores.values()))) if scores else None,
                    "dimension": model.get_embedding_dimension(), "precision": precision,
                    "bytes_per_vector": model.get_embedding_dimension() * PRECISIONS[precision],
                    "wall_time_s": round(time.perf_counter() - started, 3)},
        "protocol": encoder.protocol,
        "instructions": {call["task"]: call["instruction"] for call in encoder.calls if call["side"] == "query"},
        "instruction_sources": encoder.instruction_sources,
        "unnormalized_tasks": sorted({call["task"] for call in encoder.calls if not call["normalized"]}),
        "mteb": [task.to_dict() for task in result.task_results],
    }  # fmt: skip
    if output is not None:
        Path(output).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload


@dataclass
class EvaluationArguments:
    """The evaluation stage: the fields of ``st-synth evaluate`` and of the ``evaluate`` section of an
    ``st-synth run`` YAML file."""

    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"mteb task names (commas also separate), e.g. the offline ones: {', '.join(DEFAULT_TASKS)}."
        },
    )
    benchmark: str | None = field(
        default=None,
        metadata={
            "help": f"An mteb benchmark name (e.g. 'MTEB(eng, v2)'), or {OFFLINE_BENCHMARK!r} for the shipped tasks."
        },
    )
    instructions: bool = field(
        default=True,
        metadata={"help": "Encode with each task's instruction (--no_instructions: plain text)."},
    )
    protocol: str = field(
        default="auto",
        metadata={
            "help": "e5: the paper authors' scripts (retrieval instructs queries only, every other type all its "
            "texts, reranking included; classification embeddings not normalised). st-synth: retrieval and "
            "reranking instruct queries only, embeddings always normalised. auto: e5 for e5-style models (an "
            "st-synth embedder, or prompts that begin with 'Instruct:'), st-synth for others.",
            "choices": list(PROTOCOLS),
        },
    )
    task_instructions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Override a task's instruction, as TASK=TEXT (repeatable).",
            "action": "extend",
            "metavar": "TASK=TEXT",
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Texts encoded at once."})
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate inputs to this many tokens (default: each model's own limit); the same for every "
            "compared model."
        },
    )
    truncate_dim: list[int] = field(
        default_factory=list,
        metadata={"help": "Also score the embeddings cut to these sizes (each a separate evaluation), e.g. 1024 256 64: "
                  "for a model trained with matryoshka_dims."},
    )  # fmt: skip
    precision: list[str] = field(
        default_factory=list,
        metadata={"help": f"Also score the embeddings quantized to these precisions ({', '.join(PRECISIONS)}; "
                  "int8/uint8 calibrated per task on its first texts: a retrieval task's corpus), each a column."},
    )  # fmt: skip
    baseline: bool = field(
        default=False,
        metadata={
            "help": "Also score the untrained backbone (named by a model the recipe trained), for a before/after "
            "table."
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "Also score this reference encoder (read without instructions), e.g. all-MiniLM-L6-v2."
        },
    )

    def __post_init__(self) -> None:
        self.tasks = name_list(self.tasks)
        check_protocol(self.protocol)
        for precision in self.precision:
            check_precision(precision)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        for item in self.task_instructions:
            if "=" not in item or not item.partition("=")[0].strip():
                raise ValueError(f"task_instructions takes TASK=TEXT, got {item!r}")

    def variants(self) -> dict[str, dict[str, Any]]:
        """The trained model's other readings scored beside it, as column name -> :func:`evaluate` keywords:
        each cut size (``truncate_dim``), then each quantized precision (``precision``)."""
        return {**{f"{dim} dims": {"truncate_dim": dim} for dim in self.truncate_dim},
                **{precision: {"precision": precision} for precision in self.precision}}  # fmt: skip

    @property
    def overrides(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.task_instructions)

    def resolve(self) -> list[Any]:
        """The mteb tasks to run (the benchmark's, then the named ones); unknown names fail with matches."""
        if not self.tasks and not self.benchmark:
            raise ValueError(
                "give --tasks NAME[,NAME...] or --benchmark NAME (in a run config: evaluate.tasks, evaluate.benchmark)"
            )
        tasks = resolve_benchmark(self.benchmark) if self.benchmark else []
        chosen = {task.metadata.name for task in tasks}
        return tasks + [task for task in resolve_tasks(self.tasks) if task.metadata.name not in chosen]

    def compared_models(self, base_model: str | None, instruction_template: str | None,
                        cache_dir: str | Path | None = None) -> dict[str, tuple[str, Any, bool]]:  # fmt: skip
        """The models scored beside the trained one: name -> (fingerprint, loader, use instructions).

        ``untrained``: the backbone the recipe started from, in the same template (``baseline``);
        the ``reference`` encoder, which is no instruction model and reads texts as they are."""
        models: dict[str, tuple[str, Any, bool]] = {}
        if self.baseline:
            if not base_model:
                raise ValueError(
                    "baseline needs the backbone the model was trained from: evaluate a model folder trained by "
                    "st-synth's recipe (its card facts name the base model)."
                )

            def untrained() -> SentenceTransformer:
                return build_embedder(resolve_base_model(base_model, cache_dir), max_seq_length=self.max_seq_length
                                      or 512, instruction_template=instruction_template)  # fmt: skip

            models["untrained"] = (f"{base_model}|{instruction_template}", untrained, self.instructions)
        if self.reference:
            reference = self.reference
            models[reference] = (reference, lambda: load_guide(reference), False)
        return models


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
