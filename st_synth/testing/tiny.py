"""Tiny decoder backbones built in place, for tests, smoke runs and CPU benchmarks.

A word-level tokenizer is trained on the fly with the ``tokenizers`` library and paired with a randomly
initialised two-layer Mistral. ``eos_style`` reproduces the tokenizer behaviours an embedder must survive:

* ``"none"``: adds no special tokens, pad == EOS (like SmolLM2);
* ``"bos_only"``: adds BOS only, no EOS (like Mistral's tokenizer, whose ``add_eos_token`` flag some
  transformers versions ignore);
* ``"bos_eos"``: adds BOS and EOS itself, with a separate pad token.

``vocabulary="bytes"`` gives a byte-level tokenizer instead (one token per byte, no merges), whose
``decode`` gives back every text exactly: for tests that read what a loss received.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a an of to in on for with and or but is are was were be been it this that these those "
    "cat cats dog dogs bird fish horse cow animal animals pet pets food eat eats ate water drink "
    "bread flour yeast oven bake baking recipe cook cooking kitchen meal dinner lunch breakfast "
    "stock market price prices fell rose bank money invest investor shares trade economy "
    "football soccer team game match goal player players score won lost season "
    "computer code program python software bug error file data model train training "
    "weather rain sun snow cold hot wind storm summer winter "
    "how what why when where who which do does can should would question answer find retrieve "
    "query document passage text instruct given classify topic similar sentence relevant "
    "good bad great new old big small fast slow first last many much more most very "
    "i you he she we they my your his her our their me him us them not no yes Instruct Query "
    "0 1 2 3 4 5 6 7 8 9 Retrieve semantically sport computers"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(eos_style: str = "none", chat_template: bool = False, vocabulary: str = "words"):
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` (plus specials), or over bytes
    (``vocabulary="bytes"``), built in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    if vocabulary == "bytes":
        symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
        backend = Tokenizer(
            models.BPE({t: i for i, t in enumerate([*specials, *symbols])}, [], unk_token="<unk>")
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    elif vocabulary == "words":
        vocab = {
            token: i for i, token in enumerate([*specials, *dict.fromkeys(WORDS), ":", ".", ",", "?", "\n"])
        }
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated"),
             pre_tokenizers.Punctuation()]
        )  # fmt: skip
    else:
        raise ValueError(f"Unknown vocabulary {vocabulary!r}; choose words or bytes.")
    flags = {"none": (False, False), "bos_only": (True, False), "bos_eos": (True, True)}
    if eos_style not in flags:
        raise ValueError(f"Unknown eos_style {eos_style!r}; choose one of: {', '.join(flags)}.")
    add_bos, add_eos = flags[eos_style]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if eos_style == "bos_eos" else "</s>",
        model_max_length=4096 if vocabulary == "bytes" else 256,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_mistral(
    output_dir: str | Path,
    eos_style: str = "none",
    *,
    chat_template: bool = False,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    vocabulary: str = "words",
) -> Path:
    """Save a random two-layer Mistral and its tokenizer to ``output_dir``; return the folder."""
    import torch
    from transformers import MistralConfig, MistralModel

    tokenizer = build_tokenizer(eos_style, chat_template, vocabulary)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MistralModel(config)
    output = Path(output_dir)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    return output
