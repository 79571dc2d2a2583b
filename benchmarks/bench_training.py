"""Training throughput: plain sentence-transformers + peft vs the st-synth recipe, same run, same data.

Both train LoRA (r16 on the seven projections) with InfoNCE at scale 50 over (query, positive, negative)
triplets and gradient checkpointing, in a plain loop of forward, backward and AdamW step, so the ratio
measures the model and loss path rather than Trainer bookkeeping:

* baseline: ST ``Transformer`` (plain text) + ``Pooling("lasttoken")`` + ``Normalize``, ``add_adapter``,
  ``MultipleNegativesRankingLoss``;
* st-synth: ``st_synth.training.trainer.build_model`` + ``build_losses`` (the recipe's own objects).

Reported: non-pad tokens per second, the share of the positions the backbone computed that were padding,
peak memory, and the loss of the first steps side by side (both paths on identical batches). On the length mix the recipe then trains on the same triplets batched its own way
(``LengthGroupedBatchSampler``: similar lengths together), which is where its padding saving shows.

    python benchmarks/bench_training.py --preset tiny --steps 6                 # CPU smoke run
    python benchmarks/bench_training.py --preset mistral-7b --device cuda --steps 20 --batch-size 32

Inputs: ``fixed`` (every text 512 tokens) and ``mix`` (queries 8-64 tokens, documents 64-512).
Results: ``benchmarks/results/training-<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from st_synth.testing.tiny import WORDS, build_tiny_mistral

RESULTS = Path(__file__).parent / "results"
PRESETS = {
    "tiny": {"hidden_size": 64, "num_layers": 2},
    "small": {"hidden_size": 256, "num_layers": 4},  # CPU: enough compute per token for padding to show
    "mistral-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    # The 7B preset's code path at toy size, to check it on a CPU before spending GPU time.
    "mistral-mini": {"vocab_size": 32000, "hidden_size": 128, "intermediate_size": 448,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
}  # fmt: skip


def build_backbone(preset: str, folder: Path, device: str) -> str:
    """A random-initialised backbone folder (weights included: transformers loads nothing without them)."""
    if preset in ("tiny", "small"):
        return str(build_tiny_mistral(folder, "none", **PRESETS[preset]))
    return build_random_mistral(folder, device, **PRESETS[preset])


def build_random_mistral(folder: Path, device: str, **dims: int) -> str:
    """A random Mistral of the given dimensions in bf16, initialised on ``device`` (seconds on a GPU, where
    a 7B model on the CPU would take minutes) and saved with the st-synth test tokenizer."""
    from transformers import MistralConfig, MistralModel

    from st_synth.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer("bos_only")
    tokenizer.model_max_length = 4096
    config = MistralConfig(
        **dims, max_position_embeddings=4096, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralModel(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(folder)


def group_by_length(batches: list[list[list[str]]], seed: int) -> list[list[list[str]]]:
    """The same triplets, batched the way the recipe batches them (``LengthGroupedBatchSampler``)."""
    from datasets import Dataset

    from st_synth.training.sampling import LengthGroupedBatchSampler

    rows = [row for columns in batches for row in zip(*columns, strict=True)]
    dataset = Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(("q", "p", "n"))})
    batch_size = len(batches[0][0])
    sampler = LengthGroupedBatchSampler(dataset, batch_size=batch_size, drop_last=False, seed=seed)
    return [[[rows[i][c] for i in batch] for c in range(3)] for batch in sampler]


def make_batches(
    kind: str, steps: int, batch_size: int, max_len: int, seed: int, specials: int = 1
) -> list[list[list[str]]]:
    """``specials``: tokens each input gets besides its words (EOS, plus BOS where the tokenizer adds one)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    batches = []
    for _ in range(steps):
        if kind == "fixed":
            # words + specials = max_len tokens: nothing is cut, so both paths see the same ids
            words = max_len - specials
            columns = [[text(words, words) for _ in range(batch_size)] for _ in range(3)]
        else:
            columns = [[text(8, 64) for _ in range(batch_size)]]
            columns += [[text(64, max_len - specials) for _ in range(batch_size)] for _ in range(2)]
        batches.append(columns)
    return batches


def baseline_model(path: str, max_len: int, dtype: torch.dtype, device: str):
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling

    from st_synth.model.lora import PAPER_TARGET_MODULES

    transformer = Transformer(
        path, max_seq_length=max_len, model_kwargs={"dtype": dtype},
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )  # fmt: skip
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)
    model.add_adapter(
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(PAPER_TARGET_MODULES))
    )
    return model, MultipleNegativesRankingLoss(model, scale=50.0)


def recipe_model(path: str, max_len: int, dtype: torch.dtype, device: str):
    from datasets import Dataset, DatasetDict

    from st_synth.training.arguments import ModelArguments
    from st_synth.training.losses import LossArguments
    from st_synth.training.trainer import build_losses, build_model

    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    model = build_model(
        ModelArguments(base_model=path, max_seq_length=max_len, lora_dropout=0.0, torch_dtype=dtype_name)
    )
    model.to(device)
    sources = DatasetDict(
        {"retrieval": Dataset.from_dict({"query": ["q"], "positive": ["p"], "negative": ["n"]})}
    )
    return model, build_losses(model, sources, LossArguments(gather_across_devices=False))["retrieval"]


def _same_lora_init(model) -> None:
    """Give both paths identical LoRA weights (B non-zero, so the adapter matters from step one)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
            param.copy_((torch.randn(param.shape, generator=generator) * 0.02).to(param.dtype))


def _count_positions(backbone) -> list[int]:
    """Token positions the backbone computes per step (rows x row length, padding included), appended to
    by every call; the caller starts each step with a new 0. ST calls the backbone's forward directly."""
    counts: list[int] = []
    forward = backbone.forward

    def counted(*args, **kwargs):
        counts[-1] += kwargs["input_ids"].numel()
        return forward(*args, **kwargs)

    backbone.forward = counted
    return counts


def run(name: str, builder, path: str, batches, max_len: int, dtype: torch.dtype, device: str) -> dict:
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, loss_fn = builder(path, max_len, dtype, device)
    _same_lora_init(model)
    eos = model[0].tokenizer.eos_token if builder is baseline_model else ""  # the baseline's hand-made EOS
    model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
    computed = _count_positions(model[0].auto_model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, tokens, elapsed, padded = [], 0, 0.0, 0
    for step, columns in enumerate(batches):
        features = []
        for column in columns:
            feature = model.preprocess([text + eos for text in column])
            features.append(
                {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in feature.items()}
            )
        if device == "cuda":
            torch.cuda.synchronize()
        computed.append(0)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step pays for warm-up
            elapsed += time.perf_counter() - start
            tokens += sum(int(f["attention_mask"].sum()) for f in features)
            padded += computed[step]
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    packing = getattr(model, "packed_sequences", "off")
    fused = getattr(model, "fused_kernels", "off")
    del model, optimizer
    return {"path": name, "non_pad_tokens_per_s": tokens / elapsed, "peak_gib": peak, "losses": losses,
            "packed_sequences": packing, "fused_kernels": fused,
            "pad_fraction": round(1 - tokens / padded, 4), "steps": len(batches)}  # fmt: skip


def write_results(args: argparse.Namespace, rows: list[dict], device_name: str) -> str:
    """Results so far to training-<preset>.json and .md (after every row: a GPU call cut short keeps them)."""
    payload = {
        "preset": args.preset,
        "device": device_name,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rows": rows,
        "padding": {row["inputs"]: {"baseline": row["baseline"]["pad_fraction"], "st_synth": row["st_synth"]["pad_fraction"]}
                    for row in rows},
    }  # fmt: skip
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"training-{args.preset}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"device: {device_name}, preset {args.preset}, batch {args.batch_size} triplets, {args.steps} steps", "",
             "| inputs | baseline non-pad tok/s | st-synth non-pad tok/s | speedup | pad share (base / ours) | peak GiB (base / ours) | max loss diff, same batches |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        b, o = row["baseline"], row["st_synth"]
        peak = f"{b['peak_gib']:.1f} / {o['peak_gib']:.1f}" if b["peak_gib"] is not None else "-"
        lines.append(f"| {row['inputs']} | {b['non_pad_tokens_per_s']:.0f} | {o['non_pad_tokens_per_s']:.0f} | "
                     f"{row['speedup']:.2f}x | {b['pad_fraction']:.0%} / {o['pad_fraction']:.0%} | {peak} | "
                     f"{row['max_loss_diff_first_steps']:.2e} |")  # fmt: skip
    if rows:
        ours = rows[-1]["st_synth"]
        lines += [
            "",
            f"st-synth: packed sequences {ours['packed_sequences']}; fused kernels {ours['fused_kernels']}",
        ]
    (results / f"training-{args.preset}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--inputs", default="fixed,mix")
    parser.add_argument("--results", default=str(RESULTS), help="Folder for training-<preset>.json/.md.")
    parser.add_argument("--no-length-grouping", action="store_true", help="Mix: the baseline's batches.")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows: list[dict] = []
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_backbone(args.preset, Path(tmp) / "backbone", args.device)
        from transformers import AutoTokenizer

        specials = len(AutoTokenizer.from_pretrained(path)("word")["input_ids"])  # 1 word, maybe a BOS; + EOS
        for kind in args.inputs.split(","):
            batches = make_batches(kind, args.steps, args.batch_size, args.max_len, seed=0, specials=specials)
            base = run("baseline", baseline_model, path, batches, args.max_len, dtype, args.device)
            # Same batches first: the loss check (the recipe's model and loss must agree with the baseline).
            same = run("st_synth", recipe_model, path, batches, args.max_len, dtype, args.device)
            row = {
                "inputs": kind, "baseline": base, "st_synth_same_batches": same,
                "max_loss_diff_first_steps": max(abs(a - b) for a, b in zip(base["losses"][:5], same["losses"][:5], strict=True)),
            }  # fmt: skip
            ours = same
            if kind == "mix" and not args.no_length_grouping:
                # Then the recipe's own batching of the same triplets: similar lengths together.
                ours = run("st_synth", recipe_model, path, group_by_length(batches, seed=0), args.max_len, dtype,
                           args.device)  # fmt: skip
            row["st_synth"] = ours
            row["speedup"] = ours["non_pad_tokens_per_s"] / base["non_pad_tokens_per_s"]
            rows.append(row)
            write_results(args, rows, device_name)
            print(
                json.dumps({k: row[k] for k in ("inputs", "speedup", "max_loss_diff_first_steps")}),
                flush=True,
            )
    print(write_results(args, rows, device_name))


if __name__ == "__main__":
    main()
