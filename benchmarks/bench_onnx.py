"""CPU inference: the torch embedder vs its ONNX Runtime export (float32 and int8 weights), same texts.

SmolLM2-135M as an st-synth embedder (``build_embedder``, max_seq_length 256) is exported with
``st-synth export --quantize int8``; the three models then embed the same queries (with the query
instruction) and documents, batch 32, on every core this machine has. Runs alternate (torch, ONNX, ONNX
int8, torch, ...) and the fastest of each is reported, with the agreement (cosine) of each ONNX graph with
torch on those same texts.

    python benchmarks/bench_onnx.py [--export DIR]   # reuse an export of the same model

Results: ``benchmarks/results/onnx-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from st_synth import build_embedder
from st_synth.model.backbones import smollm2_as_mistral
from st_synth.model.export import GRAPHS, export_onnx
from st_synth.testing.tiny import WORDS

RESULTS = Path(__file__).parent / "results"
MAX_SEQ_LENGTH = 256


def texts(count: int, low: int, high: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", help="An existing export of the same model (skips exporting).")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    source = build_embedder(str(smollm2_as_mistral()), max_seq_length=MAX_SEQ_LENGTH)
    source.save(str(work / "torch"))
    export_seconds = None
    folder = Path(args.export) if args.export else work / "onnx"
    if not args.export:
        started = time.perf_counter()
        export_onnx(work / "torch", folder, quantize="int8")
        export_seconds = time.perf_counter() - started
    report = json.loads((folder / "export_report.json").read_text())
    models = {
        "torch": SentenceTransformer(str(work / "torch"), device="cpu"),
        "onnx": SentenceTransformer(
            str(folder), trust_remote_code=True, device="cpu", model_kwargs={"file_name": GRAPHS[None]}
        ),
        "onnx_int8": SentenceTransformer(
            str(folder), trust_remote_code=True, device="cpu", model_kwargs={"file_name": GRAPHS["int8"]}
        ),
    }
    workloads = {
        "queries (4-16 words + instruction)": ("encode_query", texts(args.texts, 4, 16, seed=1)),
        "documents (40-200 words, cut at 256 tokens)": (
            "encode_document",
            texts(args.texts, 40, 200, seed=2),
        ),
    }
    rows = []
    for workload, (method, inputs) in workloads.items():
        tokens = int(models["torch"][0].preprocess(inputs)["attention_mask"].sum())
        embeddings, best = {}, {name: float("inf") for name in models}
        for model in models.values():
            getattr(model, method)(inputs[: args.batch_size], batch_size=args.batch_size)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                started = time.perf_counter()
                embeddings[name] = getattr(model, method)(inputs, batch_size=args.batch_size)
                best[name] = min(best[name], time.perf_counter() - started)
        for name in models:
            cos = (embeddings[name] * embeddings["torch"]).sum(axis=1)
            rows.append({
                "workload": workload,
                "model": name,
                "texts_per_s": round(len(inputs) / best[name], 2),
                "tokens_per_s": round(tokens / best[name], 1),
                "speedup_vs_torch": round(best["torch"] / best[name], 3),
                "min_cosine_vs_torch": round(float(np.min(cos)), 6),
            })  # fmt: skip
    result = {
        "model": "SmolLM2-135M-Instruct (packaged GGUF, as Mistral) via build_embedder",
        "max_seq_length": MAX_SEQ_LENGTH,
        "batch_size": args.batch_size,
        "texts": args.texts,
        "repeats": args.repeats,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "graph_mib": {name: round(entry["bytes"] / 2**20, 1) for name, entry in report["graphs"].items()},
        "export_seconds": round(export_seconds, 1) if export_seconds else None,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# CPU inference: torch vs ONNX Runtime export",
        "",
        f"{result['model']}, max_seq_length {MAX_SEQ_LENGTH}, batch {args.batch_size}, {args.texts} texts per "
        f"workload, best of {args.repeats}; {os.cpu_count()} cores. Graphs: "
        + ", ".join(f"{name} {mib} MiB" for name, mib in result["graph_mib"].items())
        + (f"; export took {result['export_seconds']} s." if export_seconds else "."),
        "",
        "| workload | model | texts/s | text tokens/s (instruction not counted) | vs torch | min cosine vs torch |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['workload']} | {r['model']} | {r['texts_per_s']} | {r['tokens_per_s']:,.0f} | "
            f"{r['speedup_vs_torch']:.2f}x | {r['min_cosine_vs_torch']:.4f} |"
            for r in rows
        ),
    ]
    (RESULTS / "onnx-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
