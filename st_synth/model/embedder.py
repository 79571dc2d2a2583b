"""Build an e5-style embedder from any decoder LLM, from sentence-transformers' own modules.

The model is a plain ``SentenceTransformer``: ``Transformer`` -> ``Pooling("lasttoken")`` -> ``Normalize``,
so ``SentenceTransformer(path)`` loads it with no custom code (sentence-transformers 6 refuses to import
module classes from other packages without ``trust_remote_code``). What makes it an e5 embedder:

* the ``Transformer`` is pinned to plain text: inputs never go through the backbone's chat template (no
  role markers, no system prompt), whatever the tokenizer carries;
* the fast tokenizer's post-processor (Rust, saved in ``tokenizer.json``) ends every input with the EOS
  token and starts it with BOS exactly when the tokenizer added one before (Mistral does, SmolLM2 does
  not). Truncation reserves room for them, so the EOS survives any cut, and it costs nothing per text;
* named prompts are the instruction already formatted by the instruction template
  (``Instruct: {instruction}\nQuery: `` by default): ``encode_query`` prefixes it, ``encode_document`` gets
  none, and a per-call instruction is ``prompt=format_instruction(...)``, as for the e5 models on the Hub;
* the tokenizer's chat template is replaced by one rendering the same thing for chat-style callers (and
  recording the instruction template, read back by :func:`instruction_template_of`).

``Pooling("lasttoken")`` reads the last real position from the attention mask, so left and right padding
give the same embedding, also where the pad token is the EOS token.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_TEMPLATE_MARK = "st-synth instruction template: "
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def check_instruction_template(template: str) -> str:
    """``template`` if it holds ``{instruction}`` exactly once, else a ValueError saying so."""
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
        model_name_or_path: Decoder backbone folder or Hub id (Mistral, Llama, Qwen, ...); its tokenizer
            must be a fast (``tokenizers``) one.
        max_seq_length: Inputs are cut to this many tokens, EOS included (the paper uses 512).
        instruction_template: How an instruction precedes a query; must contain ``{instruction}``.
        prompts: Named prompts saved with the model, given as *instructions* (formatted here with
            ``instruction_template``; an empty one stays empty). Default
            ``{"query": default_instruction, "document": ""}``: ``encode_query`` gets the instruction,
            ``encode_document`` none.
        default_instruction: The ``"query"`` instruction when ``prompts`` names none.
        padding_side: ``"left"`` or ``"right"``; last-token pooling reads the attention mask, so both work.

    Example::

        model = build_embedder("mistralai/Mistral-7B-v0.1")
        q = model.encode_query(["how much protein should a female eat"])
        d = model.encode_document(["As a general guideline, the CDC's average requirement ..."])
        claim = format_instruction("Given a claim, find documents that refute it")
        q2 = model.encode_query(["Eating meat is bad"], prompt=claim)
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
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    tokenizer = transformer.tokenizer
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{model_name_or_path!r} has no fast (tokenizers) tokenizer, which st-synth needs to end every "
            "input with EOS; convert it with transformers' convert_slow_tokenizer or save a tokenizer.json."
        )
    if tokenizer.eos_token_id is None:
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
    end_every_input_with_eos(tokenizer, adds_bos)
    tokenizer.chat_template = embedding_chat_template(instruction_template, adds_bos)
    named = {"query": default_instruction, "document": "", **(prompts or {})}
    formatted = {
        name: format_instruction(text, instruction_template) if text else "" for name, text in named.items()
    }
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], prompts=formatted, device=device)


def end_every_input_with_eos(tokenizer: Any, add_bos: bool) -> None:
    """Make a fast tokenizer add ``[BOS] text EOS`` itself, through its post-processor: truncation keeps
    room for both, they are never doubled, and it is saved in tokenizer.json. transformers 5 drops the
    ``add_bos_token`` / ``add_eos_token`` flags when saving (a config that names them, like Mistral's
    ``add_eos_token: false``, would rebuild the post-processor on load), so the saved one is what loads."""
    from tokenizers import processors

    for flag, value in (("add_bos_token", add_bos), ("add_eos_token", True)):
        if isinstance(getattr(type(tokenizer), flag, None), property):  # a later in-memory rebuild agrees
            setattr(tokenizer, flag, value)
    bos = f"{tokenizer.bos_token}:0 " if add_bos else ""
    specials = {tokenizer.eos_token: tokenizer.eos_token_id}
    if add_bos:
        specials[tokenizer.bos_token] = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}$A:0 {tokenizer.eos_token}:0",
        pair=f"{bos}$A:0 {tokenizer.eos_token}:0 $B:1 {tokenizer.eos_token}:1",
        special_tokens=list(specials.items()),
    )
