"""Train an e5-mistral style embedder: LoRA on a decoder LLM, InfoNCE over in-batch and hard negatives.

Usage (all logic lives in ``st_synth.training.trainer``; this script only parses arguments):

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

Arguments: a YAML file (first argument) and/or flags, the same as ``st-synth train`` takes (one parser,
``st_synth.training.trainer.make_train_parser``); see ``--help`` for every field of ModelArguments, DataArguments,
LossArguments, OutputArguments and RecipeTrainingArguments (sentence-transformers' training arguments with
the recipe's defaults: length-grouped batches without duplicate texts, one source per batch, activations
recomputed).
"""

from __future__ import annotations

import sys

from st_synth.common.arguments import with_yaml
from st_synth.training.arguments import make_train_parser
from st_synth.training.trainer import run_recipe


def yaml_to_flags(path: str) -> list[str]:
    """A YAML config's settings as the recipe's flags."""
    return with_yaml(make_train_parser(), [path])


def main(argv: list[str] | None = None) -> dict:
    return run_recipe(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
