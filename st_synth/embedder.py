"""Build an e5-style embedder from any decoder LLM, from sentence-transformers' own modules.

The model is a plain ``SentenceTransformer``: ``Transformer`` -> ``Pooling("lasttoken")`` -> ``Normalize``,
so ``SentenceTransformer(path)`` loads it with no custom code (sentence-transformers 6 refuses to import
module classes from other packages without ``trust_remote_code``). What makes it an e5 embedder is the
tokenizer's chat template, written here and saved with the model:

* it renders plain text only: the content, never role markers or a system prompt of the base model;
* a system message (where sentence-transformers puts a ``prompt``) becomes the instruction, formatted by
  the instruction template, ``Instruct: {instruction}\nQuery: `` by default;
* it ends every input with the EOS token, and sentence-transformers' ``restore_suffix`` writes that EOS
  back over the last real token whenever truncation cut it off, whatever the tokenizer itself adds;
* it starts with BOS exactly when the tokenizer adds one to plain text (Mistral does, SmolLM2 does not).

``Pooling("lasttoken")`` reads the last real position from the attention mask, so left and right padding
give the same embedding, also where the pad token is the EOS token.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_TEMPLATE_MARK = "st-synth instruction template: "


def check_instruction_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{instruction}") != 1:
        raise ValueError(
            f"The instruction template {template!r} must contain '{{instruction}}' exactly once, to say where "
            f"the task instruction goes, e.g. {DEFAULT_INSTRUCTION_TEMPLATE!r}."
        )
    return template


def format_instruction(instruction: str, template: str = DEFAULT_INSTRUCTION_TEMPLATE) -> str:
    """``template`` with ``instruction`` in place: the text a query is prefixed with (e.g. in training data)."""
    return check_instruction_template(template).replace("{instruction}", instruction.strip())


def embedding_chat_template(instruction_template: str, add_bos: bool) -> str:
    """The Jinja chat template of an e5-style embedder (see the module docstring)."""
    before, after = check_instruction_template(instruction_template).split("{instruction}")
    literal = json.dumps  # a JSON string is a valid Jinja string literal, escapes included
    # Written flat (no macro call per message): it is rendered once per input text; on bench_encode's tiny
    # model that took st-synth's overhead over plain last-token pooling from 9.5% to 6.6%.
    content = (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    )
    return (
        f"{{#- {_TEMPLATE_MARK}{literal(instruction_template)} -#}}\n"
        + ("{{ bos_token }}" if add_bos else "")
        + "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'system' -%}}{{{{ {literal(before)} }}}}{content}{{{{ {literal(after)} }}}}"
        f"{{%- else -%}}{content}{{%- endif -%}}"
        "{%- endfor -%}"
        "{{ eos_token }}"
    )


def instruction_template_of(model: SentenceTransformer) -> str:
    """The instruction template an st-synth embedder was built with (read back from its chat template)."""
    template = getattr(model[0].tokenizer, "chat_template", None) or ""
    match = re.search(re.escape(_TEMPLATE_MARK) + r'("(?:[^"\\]|\\.)*")', template)
    if match is None:
        raise ValueError(
            "This model was not built by st_synth.build_embedder: its chat template has no mark."
        )
    return json.loads(match.group(1))


def build_embedder(
    model_name_or_path: str,
    *,
    max_seq_length: int = 512,
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
    prompts: dict[str, str] | None = None,
    default_instruction: str = DEFAULT_QUERY_INSTRUCTION,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    padding_side: str | None = None,
    device: str | None = None,
) -> SentenceTransformer:
    """A plain ``SentenceTransformer`` that embeds like e5-mistral: instruction, text, EOS, last token.

    Args:
        model_name_or_path: Decoder backbone folder or Hub id (Mistral, Llama, Qwen, ...).
        max_seq_length: Inputs are cut to this many tokens, EOS included (the paper uses 512).
        instruction_template: How an instruction precedes a query; must contain ``{instruction}``.
        prompts: Named prompts saved with the model: a name mapped to an *instruction* (the template is
            applied by the chat template). Default ``{"query": default_instruction, "document": ""}``:
            ``encode_query`` gets the instruction, ``encode_document`` none.
        default_instruction: The ``"query"`` instruction when ``prompts`` names none.
        padding_side: ``"left"`` or ``"right"``; last-token pooling reads the attention mask, so both work.

    Example::

        model = build_embedder("mistralai/Mistral-7B-v0.1")
        q = model.encode_query(["how much protein should a female eat"])
        d = model.encode_document(["As a general guideline, the CDC's average requirement ..."])
        q2 = model.encode_query(["Eating meat is bad"], prompt="Given a claim, find documents that refute it")
    """
    check_instruction_template(instruction_template)
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    processor_kwargs = dict(processor_kwargs or {})
    if padding_side:
        processor_kwargs["padding_side"] = padding_side
    transformer = Transformer(
        model_name_or_path,
        max_seq_length=max_seq_length,
        model_kwargs=model_kwargs,
        processor_kwargs=processor_kwargs,
    )
    tokenizer = transformer.tokenizer
    if tokenizer is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer of {model_name_or_path!r} has no EOS token, which last-token pooling needs; "
            "pass processor_kwargs={'eos_token': '<the end token>'}."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(transformer.config, "max_position_embeddings", None)
    if limit and max_seq_length > limit:
        raise ValueError(f"max_seq_length {max_seq_length} exceeds the backbone's {limit} positions.")
    probe = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    tokenizer.chat_template = embedding_chat_template(instruction_template, adds_bos)
    # The backbone's own chat template (if any) decided the modalities; the new one renders plain text.
    transformer = _reinfer_modalities(transformer)
    named = {"query": default_instruction, "document": "", **(prompts or {})}
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], prompts=named, device=device)


def _reinfer_modalities(transformer: Transformer) -> Transformer:
    modality_config, output_name = transformer.infer_modalities(transformer.model, transformer.processor)
    if "message" not in modality_config:
        raise ValueError("The backbone does not accept chat-templated text input; st-synth needs it.")
    transformer.modality_config, transformer.module_output_name = modality_config, output_name
    transformer.input_formatter.supported_modalities = list(modality_config)
    return transformer


def smollm2_as_mistral(output_dir: str | Path | None = None) -> Path:
    """Write the packaged SmolLM2-135M-Instruct as a standard Mistral-architecture HF folder.

    SmolLM2 is a Llama-architecture model; with sliding windows off, Mistral is the same network, so its
    weights load into ``MistralModel`` with ``strict=True``. The GGUF (Q4_1) is dequantised by
    transformers; the folder is written once and reused (default ``~/.cache/st_synth/smollm2-135m-mistral``).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer, MistralConfig, MistralModel

    from st_synth.local_llm import packaged_smollm2_gguf

    output = Path(output_dir or Path.home() / ".cache" / "st_synth" / "smollm2-135m-mistral")
    if (output / "config.json").is_file() and (output / "model.safetensors").is_file():
        return output
    gguf = packaged_smollm2_gguf()
    logger.info("Converting %s to a Mistral folder at %s", gguf, output)
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
    output.mkdir(parents=True, exist_ok=True)
    mistral.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return output
