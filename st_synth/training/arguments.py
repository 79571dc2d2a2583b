"""The recipe's settings: ``ModelArguments``, ``DataArguments``, ``OutputArguments``, ``LossArguments`` and
``RecipeTrainingArguments`` (``SentenceTransformerTrainingArguments`` with the recipe's defaults), and the
one parser that reads them from flags and YAML for ``st-synth train`` and ``recipes/train_mistral.py``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

from st_synth.common.arguments import SettingsParser, current_setting_name
from st_synth.data.sources import DataArguments
from st_synth.model.embedder import (
    DEFAULT_INSTRUCTION_TEMPLATE,
)
from st_synth.model.lora import PAPER_TARGET_MODULES
from st_synth.training.losses import LossArguments
from st_synth.training.sampling import LENGTH_GROUPED, SOURCE_ORDERS, LengthGroupedBatchSampler

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The model of the recipe: the backbone (a Hub id, a folder, or the ``smollm2-135m`` / ``tiny``
    shortcuts), its sequence length and instruction template, and the LoRA settings (the paper's: rank 16,
    alpha 32, dropout 0.1 on the attention and MLP projections). The fields are the flags of ``st-synth
    train`` and the keys of its YAML file."""

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
class OutputArguments:
    """What is saved beside the weights: whether the LoRA adapter is merged into the backbone, and the card's
    license, dataset id and Hub visibility."""

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
    description = ("Train an e5-style embedder: LoRA on a decoder LLM, InfoNCE over in-batch and hard negatives. "
                   "Give --config FILE.yaml (or the file first; its keys are these flags' names), then flags to "
                   "override it.")  # fmt: skip
    return SettingsParser(TRAIN_DATACLASSES, description=description)
