"""Train an e5-mistral style embedder: LoRA on a decoder LLM, InfoNCE over in-batch and hard negatives.

Usage (all logic lives in ``st_synth.training``; this script only parses arguments):

    # One CPU: a real (small) run on the packaged SmolLM2-135M, a few minutes
    python recipes/train_mistral.py recipes/configs/smollm2-cpu.yaml

    # Override anything from the command line
    python recipes/train_mistral.py recipes/configs/smollm2-cpu.yaml --dataset outputs/synthetic --max_steps 20

    # Many GPUs: the same script, another launcher
    torchrun --nproc_per_node 8 recipes/train_mistral.py recipes/configs/e5-mistral-7b.yaml
    accelerate launch --config_file recipes/configs/deepspeed_zero3.yaml \\
        recipes/train_mistral.py recipes/configs/e5-mistral-7b.yaml

    # Push the merged model with its card when done
    python recipes/train_mistral.py recipes/configs/e5-mistral-7b.yaml --push_to_hub --hub_model_id you/e5-model

Arguments: a YAML file (first argument) and/or flags; see ``--help`` for every field of ModelArguments,
DataArguments, OutputArguments and sentence-transformers' SentenceTransformerTrainingArguments. The
shipped configs set batch_sampler: no_duplicates (duplicate texts in a batch are false negatives).
"""

from __future__ import annotations

import json
import sys

from transformers import HfArgumentParser

from st_synth.training import (
    DataArguments,
    ModelArguments,
    OutputArguments,
    RecipeTrainingArguments,
    current_flags,
    settings_to_flags,
    train,
)


def yaml_to_flags(path: str) -> list[str]:
    import yaml

    with open(path) as handle:
        return settings_to_flags(yaml.safe_load(handle) or {})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, OutputArguments, RecipeTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_flags(argv[0]) + argv[1:]  # the YAML first, command-line flags on top
    model_args, data_args, output_args, training_args = parser.parse_args_into_dataclasses(
        args=current_flags(argv)
    )
    summary = train(model_args, data_args, training_args, output_args)
    if training_args.process_index == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "log_history"}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
