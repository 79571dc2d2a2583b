"""ONNX export: `st-synth export` on a tiny Mistral and on the packaged SmolLM2, loaded back with plain
`SentenceTransformer(folder, trust_remote_code=True)` and compared with the torch model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from st_synth import build_embedder, format_instruction
from st_synth.cli import main
from st_synth.model.export import FLOAT_FLOOR, GRAPHS, INT8_FLOOR, MODELING_FILE, export_onnx
from st_synth.testing.tiny import build_tiny_mistral

pytest.importorskip("onnxruntime", reason="install st-synth[onnx]")

QUERIES = ["where do otters sleep", "who wrote the first dictionary of English", "x"]
FACT = "Sea otters sleep floating on their backs, often holding paws so they do not drift apart. "
DOCUMENTS = ["Otters.", FACT, FACT * 40]  # the last one runs far past max_seq_length
CLAIM = format_instruction("Given a claim, find documents that refute it")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(torch_model: SentenceTransformer, onnx_model: SentenceTransformer) -> dict[str, np.ndarray]:
    """Cosines of ONNX vs torch embeddings: queries (saved instruction and a per-call one), documents."""
    return {
        "query": cosines(onnx_model.encode_query(QUERIES), torch_model.encode_query(QUERIES)),
        "claim": cosines(
            onnx_model.encode_query(QUERIES, prompt=CLAIM), torch_model.encode_query(QUERIES, prompt=CLAIM)
        ),
        "document": cosines(onnx_model.encode_document(DOCUMENTS), torch_model.encode_document(DOCUMENTS)),
    }


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_embedder(
        str(build_tiny_mistral(root / "backbone", eos_style="none")),
        max_seq_length=24,
        prompts={"classification": "Classify the sentiment of a review"},
    )
    model.save(str(root / "torch"))
    code = main(
        ["export", "--model", str(root / "torch"), "--output", str(root / "onnx"), "--quantize", "int8"]
    )
    assert code == 0
    return SentenceTransformer(str(root / "torch"), device="cpu"), root / "onnx"


def test_tiny_export_loads_with_plain_sentence_transformers_and_matches_torch(tiny_export):
    torch_model, folder = tiny_export
    modules = json.loads((folder / "modules.json").read_text())
    assert modules[0]["type"] == "modeling_st_synth_onnx.OnnxTransformer"
    assert (folder / MODELING_FILE).is_file()

    for graph, floor in ((GRAPHS[None], FLOAT_FLOOR), (GRAPHS["int8"], INT8_FLOOR)):
        onnx_model = SentenceTransformer(
            str(folder), trust_remote_code=True, device="cpu", model_kwargs={"file_name": graph}
        )
        assert onnx_model.prompts == torch_model.prompts
        assert onnx_model.max_seq_length == 24
        assert onnx_model.get_embedding_dimension() == torch_model.get_embedding_dimension()
        for kind, values in compare(torch_model, onnx_model).items():
            assert values.min() >= floor, (graph, kind, values)

    # The same tokens as the torch model: instruction prefix, EOS kept after the cut at max_seq_length.
    onnx_model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert onnx_model[0].file_name == GRAPHS["int8"]  # --quantize makes the int8 graph the default
    tokenizer = torch_model[0].tokenizer
    for prompt in (torch_model.prompts["query"], CLAIM, None):
        ours = onnx_model[0].preprocess(DOCUMENTS, prompt=prompt)
        theirs = torch_model[0].preprocess(DOCUMENTS, prompt=prompt)
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    long_row = onnx_model[0].preprocess(DOCUMENTS)["input_ids"][-1].tolist()
    assert len(long_row) == 24 and long_row[-1] == tokenizer.eos_token_id

    # Every saved prompt is there by name.
    named = onnx_model.encode(DOCUMENTS, prompt_name="classification")
    assert cosines(named, torch_model.encode(DOCUMENTS, prompt_name="classification")).min() >= INT8_FLOOR


def test_tiny_export_report_card_and_errors(tiny_export):
    _, folder = tiny_export
    report = json.loads((folder / "export_report.json").read_text())
    assert report["default_graph"] == GRAPHS["int8"]
    assert report["graphs"]["float32"]["agreement"]["min_cosine"] >= FLOAT_FLOOR
    assert report["graphs"]["int8"]["agreement"]["long_document_tokens"] == 24
    assert 0 < report["graphs"]["int8"]["bytes"] < report["graphs"]["float32"]["bytes"]
    card = (folder / "README.md").read_text()
    assert "## ONNX export" in card and "trust_remote_code=True" in card and GRAPHS["int8"] in card
    assert "- onnx\n" in card.split("---")[1]

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(folder), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"model_int8\.onnx"):
        SentenceTransformer(str(folder), trust_remote_code=True, model_kwargs={"file_name": "onnx/nope.onnx"})
    with pytest.raises(ValueError, match="valid: \\['file_name', 'provider', 'session_options'\\]"):
        SentenceTransformer(str(folder), trust_remote_code=True, model_kwargs={"dtype": "float16"})


def test_export_refuses_bad_input_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["export", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--quantize", "int4"])
    assert exited.value.code == 2
    assert "quantize 'int4' is unknown; choose one of: int8" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no modules.json" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_onnx(tmp_path, tmp_path / "full")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_export_matches_torch(tmp_path):
    from st_synth.model.backbones import smollm2_as_mistral

    model = build_embedder(str(smollm2_as_mistral()), max_seq_length=64)
    model.save(str(tmp_path / "torch"))
    report = export_onnx(tmp_path / "torch", tmp_path / "onnx", quantize="int8")
    assert report["graphs"]["float32"]["agreement"]["min_cosine"] >= FLOAT_FLOOR
    assert report["graphs"]["int8"]["bytes"] < 0.5 * report["graphs"]["float32"]["bytes"]
    for graph, floor in ((GRAPHS[None], FLOAT_FLOOR), (GRAPHS["int8"], INT8_FLOOR)):
        onnx_model = SentenceTransformer(
            str(tmp_path / "onnx"), trust_remote_code=True, device="cpu", model_kwargs={"file_name": graph}
        )
        for kind, values in compare(model, onnx_model).items():
            assert values.min() >= floor, (graph, kind, values)
