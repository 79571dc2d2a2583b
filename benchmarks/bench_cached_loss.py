"""Peak memory of one training step with each loss of the registry, plain and cached (GradCache), on CPU.

Each configuration runs in a fresh process: a random Mistral built in place, LoRA as the recipe adds it,
``batch`` (anchor, positive, hard negative) triplets of about ``--tokens`` tokens, one forward and backward
pass. The figure is the growth of the process's peak resident size during that step (``ru_maxrss`` after
minus before), so the model and the tokenised batch are not counted. The claim checked: with
``cached_loss`` the step's memory is bounded by the mini batch, not the batch.

    python benchmarks/bench_cached_loss.py                    # batch 256 vs mini batch 16
    python benchmarks/bench_cached_loss.py --hidden 128 --layers 2 --tokens 32

Results: benchmarks/results/cached-loss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def one_step(args: argparse.Namespace) -> dict:
    import resource

    import torch

    from st_synth.testing.tiny import build_tiny_mistral
    from st_synth.training.arguments import ModelArguments
    from st_synth.training.losses import LossArguments, build_loss
    from st_synth.training.trainer import build_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    folder = build_tiny_mistral(
        Path(args.workdir) / "tiny", "none", hidden_size=args.hidden, num_layers=args.layers
    )
    model = build_model(ModelArguments(base_model=str(folder), max_seq_length=args.tokens + 2, lora_r=8,
                                       lora_alpha=16, lora_dropout=0.0))  # fmt: skip
    words = "cat dog bird stock market price rain snow wind ball goal team river city song".split()
    columns = [[" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(args.tokens))
                for i in range(args.batch)] for j in range(3)]  # fmt: skip
    features = [model.tokenize(column) for column in columns]
    settings = LossArguments(
        cached_loss=args.cached, mini_batch_size=args.mini_batch, gather_across_devices=False
    )
    loss = build_loss(args.loss, model, settings)
    # Warm-up on two rows, so allocator pools and kernels exist before the measured step.
    small = [{k: v[:2] if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
    loss(small, None).backward()
    model.zero_grad()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    value = loss(features, None)
    value.backward()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": args.loss, "cached": args.cached, "batch": args.batch, "mini_batch": args.mini_batch if args.cached else None,
            "texts": 3 * args.batch, "step_peak_growth_mb": round((after - before) / 1024, 1),
            "process_peak_mb": round(after / 1024, 1), "step_s": round(seconds, 2), "loss_value": float(value)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="Words per text (one token each, plus EOS).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "cached-loss"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="own_negatives", help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        from st_synth.training.losses import LOSSES

        for loss in LOSSES:
            for cached, batch in ((False, args.batch), (True, args.batch), (False, args.mini_batch)):
                command = [sys.executable, __file__, "--one", "--loss", loss, "--batch", str(batch),
                           "--mini-batch", str(args.mini_batch), "--hidden", str(args.hidden), "--layers",
                           str(args.layers), "--tokens", str(args.tokens), "--threads", str(args.threads),
                           "--workdir", workdir, *(["--cached"] if cached else [])]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    payload = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
               "model": {"hidden": args.hidden, "layers": args.layers, "tokens_per_text": args.tokens + 1},
               "rows": rows}  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| loss | batch | cached (mini batch) | texts | step peak growth (MB) | step (s) | loss value |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cached = f"yes ({row['mini_batch']})" if row["cached"] else "no"
        lines.append(f"| {row['loss']} | {row['batch']} | {cached} | {row['texts']} | {row['step_peak_growth_mb']} "
                     f"| {row['step_s']} | {row['loss_value']:.4f} |")  # fmt: skip
    output.with_suffix(".md").write_text(
        f"Random Mistral, hidden {args.hidden}, {args.layers} layers, LoRA r8, {args.tokens + 1} tokens per text, "
        "CPU, one forward+backward step; peak resident growth during the step.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
