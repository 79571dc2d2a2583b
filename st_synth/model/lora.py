"""LoRA on a SentenceTransformer's backbone: target checks, and merging adapters into the weights."""

from __future__ import annotations

from collections.abc import Sequence

from sentence_transformers import SentenceTransformer

PAPER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def backbone(model: SentenceTransformer):
    """The Hugging Face model inside the first module."""
    return model[0].auto_model


def check_target_modules(model: SentenceTransformer, target_modules: Sequence[str]) -> None:
    """Refuse LoRA targets the backbone does not have, naming the linear layers it does have."""
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone(model).named_modules()}
    missing = [target for target in target_modules if target not in names]
    if missing:
        import torch

        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in backbone(model).named_modules()
             if isinstance(module, torch.nn.Linear)}
        )  # fmt: skip
        raise ValueError(
            f"LoRA target modules {missing} do not exist in {type(backbone(model)).__name__}; "
            f"its linear layers are: {', '.join(linear)}."
        )


def merge_lora(model: SentenceTransformer) -> SentenceTransformer:
    """Fold every LoRA adapter into the base weights, in place, leaving a plain model to save."""
    from peft.tuners.lora import LoraLayer

    hf_model = backbone(model)
    for name, module in list(hf_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
            setattr(parent, child, module.get_base_layer())
    if getattr(hf_model, "_hf_peft_config_loaded", False):
        hf_model._hf_peft_config_loaded = False
        hf_model.peft_config = {}
    return model
