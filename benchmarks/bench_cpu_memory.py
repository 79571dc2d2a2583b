"""What CPU training's resident peak is made of: live tensors, or the C heap that glibc keeps.

Each row is a fresh process that builds the main job's model (the packaged SmolLM2-135M as a Mistral backbone,
LoRA r8, activation checkpointing, 64 tokens per text) and runs ``--steps`` forward and backward passes of the
in-batch loss over ``--batch`` (anchor, positive, hard negative) triplets, as the main job with mined negatives
does (16 triplets: 48 texts). The rows differ only in glibc's malloc settings, given in the environment:

* glibc's defaults: blocks freed by a step stay in the heap for reuse (its mmap threshold rises to 32 MiB);
* ``MALLOC_MMAP_THRESHOLD_=N``: every block of N bytes or more gets its own mapping and goes back to the
  system when freed, so the peak approaches what is alive at once (64 KiB: nearly every activation).

Figures: the process's peak resident size after loading and after the steps (``ru_maxrss``) and the median
step time. The pipeline itself (``st_synth.common.memory.release_memory``) only returns the heap's free pages
between stages, which costs nothing during a step.

    python benchmarks/bench_cpu_memory.py                      # 5 settings, 3 steps each
    python benchmarks/bench_cpu_memory.py --batch 8 --steps 2

Results: benchmarks/results/cpu-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from _results import current_commit

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"glibc defaults": None, "mmap threshold 8 MiB": 8 << 20, "mmap threshold 4 MiB": 4 << 20,
            "mmap threshold 1 MiB": 1 << 20, "mmap threshold 64 KiB": 64 << 10}  # fmt: skip


def steps(args: argparse.Namespace) -> dict:
    import random
    import time

    import torch

    from st_synth.common.memory import peak_rss_mb
    from st_synth.training.arguments import ModelArguments
    from st_synth.training.losses import LossArguments, build_loss
    from st_synth.training.trainer import build_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model(ModelArguments(base_model="smollm2-135m", max_seq_length=64, lora_r=8, lora_alpha=16,
                                       lora_dropout=0.05))  # fmt: skip
    model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loaded = peak_rss_mb()
    words = "the of and a to in is was for on that with as by at from his it an were are which be this has".split()
    rng = random.Random(0)
    columns = [[" ".join(rng.choice(words) for _ in range(80)) for _ in range(args.batch)] for _ in range(3)]
    features = [model.tokenize(column) for column in columns]
    loss = build_loss("in_batch", model, LossArguments(gather_across_devices=False))
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss(features, None).backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return {"texts": 3 * args.batch, "tokens_per_text": int(features[0]["attention_mask"].sum(1).max()),
            "loaded_peak_mb": loaded, "peak_mb": peak_rss_mb(), "step_s": [round(s, 1) for s in seconds],
            "median_step_s": round(statistics.median(seconds), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="Triplets per step (three texts each).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "cpu-memory"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(steps(args)))
        return
    rows = []
    for name, threshold in SETTINGS.items():
        env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
        if threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
        command = [sys.executable, __file__, "--one", "--batch", str(args.batch), "--steps", str(args.steps),
                   "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        rows.append(
            {"setting": name, "mmap_threshold": threshold} | json.loads(done.stdout.strip().splitlines()[-1])
        )
        print(json.dumps(rows[-1]), flush=True)
    commit = current_commit()
    date = datetime.date.today().isoformat()
    payload = {"date": date, "commit": commit, "machine": {"cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "python": platform.python_version()}, "rows": rows}  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    base = rows[0]
    lines = ["| malloc setting | peak after loading (MB) | peak after the steps (MB) | median step (s) | step time vs defaults |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        ratio = row["median_step_s"] / base["median_step_s"]
        lines.append(f"| {row['setting']} | {row['loaded_peak_mb']:,} | {row['peak_mb']:,} | {row['median_step_s']} "
                     f"| {ratio:.2f}x |")  # fmt: skip
    output.with_suffix(".md").write_text(
        f"# Where CPU training's resident peak goes\n\n`python benchmarks/bench_cpu_memory.py` ({date}, commit "
        f"{commit}, {os.cpu_count()} cores, nothing else running): SmolLM2-135M as a Mistral backbone, LoRA r8, "
        f"activation checkpointing, {base['texts']} texts of {base['tokens_per_text']} tokens per step (the main "
        f"job's batch with mined negatives), {args.steps} forward+backward steps, each setting in a fresh "
        "process.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
