"""The recipe itself at 7B size: ``recipes/train_mistral.py`` with ``recipes/configs/e5-mistral-7b.yaml``.

``bench_training.py`` times the model and loss path in a plain loop; this runs what a user runs: the
recipe's YAML through ``SentenceTransformerTrainer`` (bf16, activation checkpointing, the cached loss at
the paper's temperature, length-grouped one-source batches), then the LoRA merge, the save, and a plain
``SentenceTransformer(path)`` load of the merged model with ``encode_query`` / ``encode_document``.
The backbone has Mistral-7B's dimensions and random weights (no weights can be fetched on the device
machine), so the loss says nothing about quality; what is checked is that the path runs, and how fast.

    python benchmarks/gpu_recipe_check.py --preset mistral-mini --device cpu   # CPU, toy size, first
    python benchmarks/gpu_recipe_check.py --preset mistral-7b --device cuda    # the device call

Results: ``recipe-<preset>.json`` in ``--results``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_training import PRESETS, build_random_mistral
from st_synth.common.names import FINAL_DIR
from st_synth.testing.tiny import WORDS

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "e5-mistral-7b.yaml"


def synthetic_folder(folder: Path, rows: int, seed: int = 0) -> Path:
    """A ``st-synth generate``-shaped folder (one split per kind) of random-word triplets: queries of
    8-64 words, documents of 64-400, so the length-grouped sampler and packing have lengths to work on."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    def split(instruction: str) -> Dataset:
        return Dataset.from_dict({
            "instruction": [instruction] * rows,
            "query": [text(8, 64) for _ in range(rows)],
            "positive": [text(64, 400) for _ in range(rows)],
            "negative": [text(64, 400) for _ in range(rows)],
        })  # fmt: skip

    DatasetDict({
        "retrieval": split("Given a question, retrieve passages that answer it"),
        "long_long": split("Retrieve documents on the same topic as the given document"),
    }).save_to_disk(str(folder))  # fmt: skip
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["mistral-7b", "mistral-mini"], default="mistral-mini")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128, help="Per-device batch (the cached loss).")
    parser.add_argument("--steps-per-source", type=int, default=2)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer
    from transformers import TrainerCallback

    from st_synth.training.trainer import run_recipe

    step_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(-time.perf_counter())

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times[-1] += time.perf_counter()

    import st_synth.training.trainer as training

    original_init = training.RecipeTrainer.__init__

    def init_with_clock(self, *a, **k):
        original_init(self, *a, **k)
        self.add_callback(StepClock())

    training.RecipeTrainer.__init__ = init_with_clock
    result: dict = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    out_file = results / f"recipe-{args.preset}.json"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        backbone = build_random_mistral(Path(tmp) / "backbone", args.device, **PRESETS[args.preset])
        result["build_backbone_s"] = round(time.perf_counter() - start, 1)
        data = synthetic_folder(Path(tmp) / "data", rows=args.batch_size * args.steps_per_source)
        output = Path(tmp) / "run"
        flags = [str(CONFIG), "--base_model", backbone, "--dataset", str(data), "--output_dir", str(output),
                 "--per_device_train_batch_size", str(args.batch_size), "--warmup_steps", "1",
                 "--logging_steps", "1", "--use_cpu", str(args.device == "cpu").lower()]  # fmt: skip
        if args.device == "cpu":
            flags += ["--bf16", "false", "--torch_dtype", "float32"]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = run_recipe(flags)
        result["recipe_s"] = round(time.perf_counter() - start, 1)
        result["peak_gib"] = (
            round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None
        )
        result["step_s"] = [round(t, 2) for t in step_times]
        result["summary"] = {k: summary[k] for k in ("train_loss", "global_steps", "steps_per_source",
                                                     "fused_kernels", "packed_sequences", "batch_sampler", "loss")}  # fmt: skip
        result["losses"] = [row["loss"] for row in summary["log_history"] if "loss" in row]
        out_file.write_text(json.dumps(result, indent=2) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        start = time.perf_counter()
        model = SentenceTransformer(str(output / FINAL_DIR), device=args.device)
        result["load_merged_s"] = round(time.perf_counter() - start, 1)
        queries = model.encode_query(["what is a random word?", "two words"], convert_to_tensor=True)
        documents = model.encode_document(["a random word is a word.", "tea"], convert_to_tensor=True)
        result["merged"] = {
            "modules": [type(m).__name__ for m in model],
            "dimension": int(queries.shape[1]),
            "query_prompt": model.prompts.get("query", ""),
            "similarity": model.similarity(queries, documents).float().cpu().tolist(),
            "finite": bool(torch.isfinite(queries).all() and torch.isfinite(documents).all()),
            "saved_files": sorted(p.name for p in (output / FINAL_DIR).iterdir()),
        }
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
