#!/usr/bin/env bash
# The training-speed GPU run in ONE device call (H100/H200; 15 device minutes per session, all tries).
#
#   here, once:  bash benchmarks/gpu_training.sh --fetch     # wheels into .gpu-wheels/ (gitignored, ~17 MB)
#   here, check: bash benchmarks/gpu_training.sh --cpu-check # the same code path at toy size on the CPU
#   device:      run(command="bash benchmarks/gpu_training.sh", carry=[".gpu-wheels"], timeout_s=560)
#   recipe:      run(command="bash benchmarks/gpu_training.sh --recipe", carry=[".gpu-wheels"], timeout_s=450)
#                (measured 2026-11-28: 113 s of command on a warm H200, about 150 s cold)
#
# The device image has torch 2.11, transformers 5.17, sentence-transformers 6.0.1, peft 0.21.0 and no
# datasets (OFFLINE.md); ST 6.0.1 + transformers 5.17 fail on gradient checkpointing. The carried wheels put
# the stack st-synth is tested with over it, keeping the image's CUDA torch, and add liger-kernel. Results
# (training-mistral-7b.json/.md, written after each input kind) land in $OUT; copy them to benchmarks/results/.
# There, `pip` on the PATH is not the pip of `python3` (/opt/torch/.venv), hence `python3 -m pip`.
# Measured 2026-11-28: 265 s of command on a warm H200 (results in benchmarks/results/training-mistral-7b.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
PINS="transformers==5.23.0 sentence-transformers==6.2.0 peft==0.21.2 datasets==4.4.1 dill==0.4.0 liger-kernel==0.8.5"

if [[ "${1:-}" == "--fetch" ]]; then
    pip download --quiet --no-deps -d "$WHEELS" $PINS
    for version in 3.10 3.11 3.12 3.13; do  # the image's Python is not known in advance
        pip download --quiet --no-deps --only-binary=:all: --python-version "$version" -d "$WHEELS" multiprocess==0.70.18
    done
    du -sh "$WHEELS"
    exit 0
fi

if [[ "${1:-}" == "--cpu-check" ]]; then
    python benchmarks/bench_training.py --preset mistral-mini --device cpu --steps 3 --batch-size 4 --max-len 128 \
        --results "${OUT:-/tmp/gpu-training-check}"
    exit 0
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
py="py$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
python3 -m pip install --quiet --no-deps --no-index $(ls "$WHEELS"/*.whl | grep -v multiprocess) "$WHEELS"/multiprocess-*-"$py"-*.whl
export PYTHONPATH="$PWD" TOKENIZERS_PARALLELISM=false
python3 -c "import st_synth.training.trainer, liger_kernel, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [[ "${1:-}" == "--recipe" ]]; then  # the recipe itself (Trainer, merge, save, load): gpu_recipe_check.py
    # From the source tree the card templates are not inside the package (pyproject maps them in at install).
    ln -sfn "$PWD/model_card_templates" st_synth/model_card_templates
    python3 benchmarks/gpu_recipe_check.py --preset mistral-7b --device cuda --results "${OUT:-benchmarks/results}"
    exit 0
fi
# 8 steps per run (the first is warm-up), 32 triplets of up to 512 tokens: about 5 runs of a minute plus
# loading the random 7B backbone each time.
python3 benchmarks/bench_training.py --preset mistral-7b --device cuda --steps 8 --batch-size 32 \
    --results "${OUT:-benchmarks/results}" 2>&1 | grep -v "it/s\]" | tail -40
