"""``st-synth export``: an ONNX Runtime copy of a trained embedder, checked against the original.

The backbone (LoRA merged) is exported with ``torch.onnx.export`` (the dynamo exporter, dynamic batch and
length) to ``onnx/model.onnx``; ``--quantize int8`` adds ``onnx/model_int8.onnx`` (int8 weights in blocks
of 32, activations in float32; see :func:`_quantize_int8`) and makes it the default graph. Everything
else is the model's own: tokenizer with its EOS post-processor, prompts, ``Pooling`` and ``Normalize``.
The folder loads with ``SentenceTransformer(folder, trust_remote_code=True)`` through
:class:`st_synth.model.onnx_module.OnnxTransformer`, written beside it (see that module for why not optimum).

Before the folder is moved into place, both graphs embed probe queries (with the query instruction) and
documents (one cut at ``max_seq_length``) and are compared with the torch model: the float graph must agree
to cosine >= 0.999 or the export fails; the int8 graph's agreement is measured and recorded.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st_synth.model import onnx_module

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
MODELING_FILE = "modeling_st_synth_onnx.py"
REPORT_FILE = "export_report.json"
FLOAT_FLOOR = 0.999
# int8 is lossy by design; below this on the probes, the export warns (the report has the figure).
INT8_FLOOR = 0.99
GRAPHS = {None: "onnx/model.onnx", "int8": "onnx/model_int8.onnx"}

PROBE_QUERIES = [
    "how much protein should a female eat",
    "symptoms of a broken ankle",
    "Wie hoch ist die Zugspitze?",
]
PROBE_DOCUMENTS = [
    "As a general guideline, the average protein requirement for women ages 19 to 70 is 46 grams per day.",
    "Die Zugspitze ist mit 2962 m der höchste Berg Deutschlands.",
    "Paris",
]
_LONG = "The river rose through the night and by morning the bridge to the old mill was under water. "


@dataclass
class ExportArguments:
    """The settings of ``st-synth export``: the model folder, an empty folder for the ONNX Runtime copy, the
    weight quantization (or none), the opset, and whether the copy is checked against the original."""

    model: str = field(
        metadata={"help": "A SentenceTransformer folder or Hub id (e.g. a `st-synth run` model)."}
    )
    output: str = field(metadata={"help": "An empty or new folder for the ONNX export."})
    quantize: str | None = field(default=None, metadata={
        "help": "Also write a graph with int8 weights (blocks of 32, float32 activations) and load it by default.",
        "choices": list(QUANTIZATIONS)})  # fmt: skip
    opset: int = field(default=18, metadata={"help": "ONNX opset of the exported graph."})
    verify: bool = field(default=True, metadata={
        "help": "Compare the export with the torch model on probe texts (--no_verify skips it, e.g. where "
        "memory holds only one copy of a 7B model)."})  # fmt: skip


def export_onnx(
    model: str | Path,
    output: str | Path,
    *,
    quantize: str | None = None,
    opset: int = 18,
    verify: bool = True,
) -> dict[str, Any]:
    """Export ``model`` to ``output`` (see the module docstring); return the export report."""
    if quantize not in GRAPHS:
        raise ValueError(
            f"quantize {quantize!r} is unknown; choose one of: {', '.join(QUANTIZATIONS)} (or none)."
        )
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} exists and is not an empty folder; name a new one.")
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'st-synth[onnx]' ({error})."
        ) from error
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer

    if Path(model).exists() and not (Path(model) / "modules.json").is_file():
        raise ValueError(f"{model} is not a saved SentenceTransformer folder (no modules.json).")
    source = SentenceTransformer(str(model), device="cpu")
    first = source[0]
    if not isinstance(first, Transformer):
        raise ValueError(
            f"The first module of {model} is a {type(first).__name__}; export handles a Transformer."
        )
    backbone = first.model
    if hasattr(backbone, "merge_and_unload"):  # a peft model: the LoRA weights go into the graph
        backbone = backbone.merge_and_unload()
    backbone = backbone.float().eval()

    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "onnx").mkdir(parents=True)
    started = time.perf_counter()
    _export_graph(backbone, first, staging / GRAPHS[None], opset)
    exported_s = time.perf_counter() - started
    if quantize:
        _quantize_int8(staging / GRAPHS[None], staging / GRAPHS[quantize])

    hidden = int(backbone.config.hidden_size)
    first.tokenizer.save_pretrained(str(staging))
    module = onnx_module.OnnxTransformer(
        str(staging),
        max_seq_length=first.max_seq_length,
        embedding_dimension=hidden,
        file_name=GRAPHS[quantize],
    )
    exported = SentenceTransformer(
        modules=[module, *list(source)[1:]],
        prompts=source.prompts,
        default_prompt_name=source.default_prompt_name,
        similarity_fn_name=source.similarity_fn_name,
        device="cpu",
    )
    exported.save(str(staging))
    del exported, module
    _point_modules_json_at_modeling_file(staging)
    shutil.copyfile(onnx_module.__file__, staging / MODELING_FILE)
    backbone.config.save_pretrained(str(staging))

    report: dict[str, Any] = {
        "source": str(model),
        "opset": opset,
        "max_seq_length": first.max_seq_length,
        "embedding_dimension": source.get_embedding_dimension(),
        "default_graph": GRAPHS[quantize],
        "graphs": {
            name: {"file": path, "bytes": _graph_bytes(staging / path)}
            for name, path in (
                ("float32", GRAPHS[None]),
                *(((quantize, GRAPHS[quantize]),) if quantize else ()),
            )
        },
        "export_seconds": round(exported_s, 1),
    }
    if verify:
        reference = probe_embeddings(source)  # the torch model's, once for every graph
        for name, entry in report["graphs"].items():
            entry["agreement"] = agreement(source, reference, staging, entry["file"])
            floor = FLOAT_FLOOR if name == "float32" else INT8_FLOOR
            if entry["agreement"]["min_cosine"] < floor:
                if name == "float32":
                    shutil.rmtree(staging, ignore_errors=True)
                    raise RuntimeError(
                        f"The ONNX graph disagrees with the torch model (min cosine "
                        f"{entry['agreement']['min_cosine']:.5f} < {FLOAT_FLOOR}); nothing was written to {output}."
                    )
                logger.warning("The %s graph agrees with the torch model to min cosine %.4f only (< %s).",
                               name, entry["agreement"]["min_cosine"], floor)  # fmt: skip
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _write_card(staging, Path(model), report, output.name)
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return report


def _export_graph(backbone: Any, transformer: Any, path: Path, opset: int) -> None:
    import torch

    class Backbone(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = transformer.preprocess(["an example input", "a second, somewhat longer example input text"])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        torch.onnx.export(
            Backbone(backbone).eval(),
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
        )


def _quantize_int8(source: Path, target: Path) -> None:
    """int8 weights in blocks of 32 along the input dimension, symmetric, activations left in float32
    (ONNX Runtime's MatMulNBits). Measured on SmolLM2-135M: cosine 0.9995 with the float graph, where
    dynamic quantization (int8 activations with one scale per tensor) fell to 0.71: decoder hidden states
    carry a few huge activations that a per-tensor scale cannot hold."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(
        str(target), use_external_data_format=_graph_bytes(source) > 2**31 - 2**26
    )


def _graph_bytes(path: Path) -> int:
    """The graph file and its external-data files."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


def _point_modules_json_at_modeling_file(folder: Path) -> None:
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    modules[0]["type"] = f"{Path(MODELING_FILE).stem}.{onnx_module.OnnxTransformer.__name__}"
    modules_file.write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


def probe_texts(max_seq_length: int) -> tuple[list[str], list[str]]:
    """Queries and documents the export is checked on; one document runs past ``max_seq_length``."""
    long_document = _LONG * max(2, max_seq_length // 8)
    return PROBE_QUERIES, [*PROBE_DOCUMENTS, long_document]


def probe_embeddings(model: Any) -> dict[str, Any]:
    """``model``'s normalised embeddings of the probes: ``encode_query`` of the queries, ``encode_document``
    of the documents (cut at the model's max_seq_length)."""
    queries, documents = probe_texts(model.max_seq_length)
    return {
        "encode_query": model.encode_query(queries, normalize_embeddings=True, convert_to_numpy=True),
        "encode_document": model.encode_document(documents, normalize_embeddings=True, convert_to_numpy=True),
    }


def agreement(source: Any, reference: dict[str, Any], folder: str | Path, file_name: str) -> dict[str, Any]:
    """Cosine of each probe's embedding from the export (graph ``file_name``) with the torch model's
    (``reference``: :func:`probe_embeddings` of ``source``)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    onnx_model = SentenceTransformer(
        str(folder), trust_remote_code=True, device="cpu", model_kwargs={"file_name": file_name}
    )
    ours = probe_embeddings(onnx_model)
    pairs = [float(np.dot(a, b)) for method, theirs in reference.items()
             for a, b in zip(ours[method], theirs, strict=True)]  # fmt: skip
    _, documents = probe_texts(source.max_seq_length)
    cut = len(source[0].preprocess([documents[-1]])["input_ids"][0])
    return {
        "probes": len(pairs),
        "min_cosine": round(min(pairs), 6),
        "mean_cosine": round(sum(pairs) / len(pairs), 6),
        "long_document_tokens": cut,
    }


def _write_card(folder: Path, source: Path, report: dict[str, Any], name: str) -> None:
    """The source model's card with an ONNX section after its metadata (or a short card of its own)."""
    source_card = source / "README.md"
    text = source_card.read_text(encoding="utf-8") if source_card.is_file() else ""
    front = ""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4) + 5
        front, text = text[:end], text[end:]
        if "\ntags:\n" in front and "\n- onnx\n" not in front:
            front = front.replace("\ntags:\n", "\ntags:\n- onnx\n", 1)
    rows = "\n".join(
        f"| `{entry['file']}` | {name} | {entry['bytes'] / 2**20:,.1f} MiB | "
        + (f"{entry['agreement']['min_cosine']:.4f} |" if "agreement" in entry else "not checked |")
        for name, entry in report["graphs"].items()
    )
    section = f"""
## ONNX export

This folder is an ONNX Runtime export made with `st-synth export` (from `{report["source"]}`). It needs
`onnxruntime`, not st-synth, and loads through the module in `{MODELING_FILE}`:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}", trust_remote_code=True)
queries = model.encode_query(["how much protein should a female eat"])
documents = model.encode_document(["As a general guideline, the CDC's average requirement ..."])
# another graph or execution provider:
# SentenceTransformer(..., trust_remote_code=True, model_kwargs={{"file_name": "onnx/model.onnx", "provider": "CUDAExecutionProvider"}})
```

| graph | weights | size | min cosine with the torch model on the probes |
|---|---|---|---|
{rows}

Default graph: `{report["default_graph"]}`. Prompts, the EOS-ending tokenizer, last-token pooling and
normalisation are those of the source model; inputs are cut at {report["max_seq_length"]} tokens.
"""
    (folder / "README.md").write_text(front + section + text, encoding="utf-8")
