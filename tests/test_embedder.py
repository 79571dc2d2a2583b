"""The decoder embedder: EOS after truncation, plain text, instructions, padding, save/load, LoRA."""

from __future__ import annotations

import json
import os

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer

from st_synth import build_embedder, format_instruction
from st_synth.evaluation.instructions import get_instruction
from st_synth.model.embedder import instruction_template_of
from st_synth.model.lora import check_target_modules, merge_lora
from st_synth.testing.tiny import build_tiny_mistral, build_tokenizer

TEXTS = [
    "how do i bake bread",
    "the stock market fell",
    "cats and dogs are pets",
    " ".join(["the cat eats fish"] * 30),  # far past max_seq_length
]
MAX_LEN = 24


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        style: str(build_tiny_mistral(root / style, style, chat_template=True))
        for style in ("none", "bos_only", "bos_eos")
    }


def fed_ids(model: SentenceTransformer, encode) -> list[list[int]]:
    """The token ids the backbone really receives (real tokens only), in the order it receives them.

    Captured by a hook on the first module's forward, whose features go to the backbone unchanged.
    """
    seen: list[list[int]] = []

    def hook(_module, args):
        features = args[0]
        ids, mask = features["input_ids"], features["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))

    handle = model[0].register_forward_pre_hook(hook)
    try:
        encode()
    finally:
        handle.remove()
    return seen


def test_fixture_tokenizers_behave_as_named():
    ids = {style: build_tokenizer(style)("the cat")["input_ids"] for style in ("none", "bos_only", "bos_eos")}
    eos, bos = 2, 1
    assert ids["none"][0] != bos and ids["none"][-1] != eos
    assert ids["bos_only"][0] == bos and ids["bos_only"][-1] != eos
    assert ids["bos_eos"][0] == bos and ids["bos_eos"][-1] == eos


@pytest.mark.parametrize("style", ["none", "bos_only", "bos_eos"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_every_input_ends_with_exactly_one_eos_after_truncation(tiny_models, style, padding_side):
    model = build_embedder(tiny_models[style], max_seq_length=MAX_LEN, padding_side=padding_side)
    tokenizer = model[0].tokenizer
    ids = fed_ids(model, lambda: model.encode_document(TEXTS, batch_size=4))
    assert len(ids) == len(TEXTS)
    plain = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    for row in ids:
        assert row[-1] == tokenizer.eos_token_id
        assert len(row) <= MAX_LEN
        assert row[-2] != tokenizer.eos_token_id  # no double EOS, also where the tokenizer adds one
        assert (row[0] == tokenizer.bos_token_id) == (style != "none")
        body = row[1:-1] if style != "none" else row[:-1]
        assert any(body == text[: len(body)] for text in plain)  # the text itself, nothing added
    assert max(len(row) for row in ids) == MAX_LEN  # the long text was cut, and still ends with EOS


def test_model_sees_only_instruction_text_and_eos_despite_chat_template(tiny_models):
    path = tiny_models["none"]
    model = build_embedder(path, max_seq_length=64, default_instruction="classify the topic")
    tokenizer = model[0].tokenizer
    assert tokenizer.chat_template  # the trap is armed: plain ST would wrap the text in chat markers
    plain_st = SentenceTransformer(modules=[Transformer(path)])
    assert "message" in plain_st[0].modality_config
    query = fed_ids(model, lambda: model.encode_query(["the cat eats fish"]))[0]
    assert tokenizer.decode(query) == "Instruct : classify the topic \n Query : the cat eats fish </s>"
    document = fed_ids(model, lambda: model.encode_document(["the cat eats fish"]))[0]
    assert tokenizer.decode(document) == "the cat eats fish </s>"
    per_call = format_instruction("find similar sentence")
    ids = fed_ids(model, lambda: model.encode_query(["the dog"], prompt=per_call))[0]
    assert tokenizer.decode(ids) == "Instruct : find similar sentence \n Query : the dog </s>"
    # Chat-style callers of the tokenizer get the same thing from its chat template.
    chat = [{"role": "system", "content": "find similar sentence"}, {"role": "user", "content": "the dog"}]
    assert tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False) == ids


def test_eos_survives_a_config_that_rebuilds_the_post_processor_without_it(tiny_models, tmp_path):
    """Mistral's tokenizer_config says add_bos_token: true, add_eos_token: false, and transformers rebuilds
    the post-processor from those flags whenever it loads such a tokenizer."""
    import shutil

    backbone = tmp_path / "mistral-like"
    shutil.copytree(tiny_models["bos_only"], backbone)
    config_path = backbone / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": False}))
    model = build_embedder(str(backbone), max_seq_length=MAX_LEN)
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"))
    for embedder in (model, loaded):
        tokenizer = embedder[0].tokenizer
        for row in fed_ids(embedder, lambda e=embedder: e.encode_document(TEXTS, batch_size=4)):
            assert row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.eos_token_id != row[-2]


def test_batched_single_and_padding_sides_agree(tiny_models):
    right = build_embedder(tiny_models["bos_eos"], max_seq_length=MAX_LEN, padding_side="right")
    left = build_embedder(tiny_models["bos_eos"], max_seq_length=MAX_LEN, padding_side="left")
    batched = right.encode_query(TEXTS, batch_size=4, convert_to_tensor=True)
    single = torch.stack([right.encode_query([t], convert_to_tensor=True)[0] for t in TEXTS])
    left_batched = left.encode_query(TEXTS, batch_size=4, convert_to_tensor=True)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched, left_batched, atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_save_and_load_with_plain_sentence_transformer(tiny_models, tmp_path):
    model = build_embedder(
        tiny_models["bos_only"], max_seq_length=MAX_LEN, prompts={"sts": "find similar sentence"}
    )
    before_q = model.encode_query(TEXTS)
    before_d = model.encode_document(TEXTS)
    model.save_pretrained(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    modules = json.loads((tmp_path / "saved" / "modules.json").read_text())
    assert all(module["type"].startswith("sentence_transformers.") for module in modules)  # no custom code
    assert "Instruct: " in (tmp_path / "saved" / "chat_template.jinja").read_text()
    prompts = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["sts"] == "Instruct: find similar sentence\nQuery: " and prompts["document"] == ""
    loaded = SentenceTransformer(str(tmp_path / "saved"))  # plain: no trust_remote_code, no st_synth code
    assert loaded.max_seq_length == MAX_LEN
    tokenizer = loaded[0].tokenizer  # the EOS comes from the saved tokenizer itself, cut or not
    assert tokenizer("the cat")["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer(TEXTS[-1], truncation=True, max_length=8)["input_ids"][-1] == tokenizer.eos_token_id
    assert instruction_template_of(loaded) == "Instruct: {instruction}\nQuery: "
    assert (loaded.encode_query(TEXTS) == before_q).all()
    assert (loaded.encode_document(TEXTS) == before_d).all()
    sts = model.encode_query(TEXTS, prompt_name="sts")
    assert (loaded.encode_query(TEXTS, prompt_name="sts") == sts).all()
    assert not (sts == before_q).all()


def test_instruction_templates(tiny_models):
    with pytest.raises(ValueError, match=r"must contain '\{instruction\}' exactly once"):
        build_embedder(tiny_models["none"], instruction_template="Query: ")
    with pytest.raises(ValueError, match="exceeds the backbone's 256 positions"):
        build_embedder(tiny_models["none"], max_seq_length=4096)
    custom = build_embedder(
        tiny_models["bos_eos"], max_seq_length=MAX_LEN, instruction_template="{instruction} : "
    )
    tokenizer = custom[0].tokenizer
    prompt = format_instruction("classify the topic", "{instruction} : ")
    ids = fed_ids(custom, lambda: custom.encode_query(["the cat"], prompt=prompt))[0]
    assert tokenizer.decode(ids) == "<s> classify the topic : the cat </s>"
    assert (
        format_instruction("classify the topic") + "the cat" == "Instruct: classify the topic\nQuery: the cat"
    )


def test_lora_adapter_and_merged_model_round_trip(tiny_models, tmp_path):
    from peft import LoraConfig

    model = build_embedder(tiny_models["none"], max_seq_length=MAX_LEN)
    base = model.encode_query(TEXTS, convert_to_tensor=True)
    with pytest.raises(ValueError, match=r"its linear layers are: .*q_proj"):
        check_target_modules(model, ["query_key_value"])
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained adapter is not the identity
    adapted = model.encode_query(TEXTS, convert_to_tensor=True)
    assert not torch.allclose(adapted, base, atol=1e-3)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = SentenceTransformer(str(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded.encode_query(TEXTS, convert_to_tensor=True), adapted)
    merge_lora(model)
    model.save_pretrained(str(tmp_path / "merged"))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = SentenceTransformer(str(tmp_path / "merged"))
    torch.testing.assert_close(
        merged.encode_query(TEXTS, convert_to_tensor=True), adapted, atol=1e-5, rtol=1e-4
    )


def test_instruction_registry():
    assert get_instruction("MSMARCO").startswith("Given a web search query")
    assert get_instruction("STSBenchmark") == "Retrieve semantically similar text."
    assert get_instruction("MyNewSTS", task_type="STS") == "Retrieve semantically similar text."
    with pytest.raises(KeyError, match=r"Did you mean .*SciFact"):
        get_instruction("Scifact")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ST_SYNTH_SKIP_SMOLLM2") == "1", reason="SmolLM2 tests switched off")
def test_pretrained_smollm2_as_mistral(tmp_path):
    pytest.importorskip("gguf")
    from st_synth.model.backbones import smollm2_as_mistral

    model = build_embedder(str(smollm2_as_mistral()), max_seq_length=128)
    assert type(model[0].auto_model).__name__ == "MistralModel"
    # Untrained, a decoder's last token already tells paraphrases from unrelated sentences.
    left = ["How do I bake bread at home?", "Who won the football match yesterday?",
            "The stock market fell sharply today.", "My cat likes to sleep in the sun."]  # fmt: skip
    right = ["What is the way to make bread in my own kitchen?", "Which team won the soccer game last night?",
             "Share prices dropped a lot on the exchange today.", "The kitten enjoys napping in sunny spots."]  # fmt: skip
    scores = model.similarity(model.encode_document(left), model.encode_document(right))
    assert scores.argmax(dim=1).tolist() == [0, 1, 2, 3]
    queries = model.encode_query(left[:1])
    model.save_pretrained(str(tmp_path / "smol"))
    reloaded = SentenceTransformer(str(tmp_path / "smol"))
    assert (reloaded.encode_query(left[:1]) == queries).all()
