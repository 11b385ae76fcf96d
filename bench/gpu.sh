#!/usr/bin/env bash
# The GPU benchmark, on one GPU machine with no registry, in about 8 minutes; a Markdown report in $OUT.
#
#   bench/gpu_wheels.sh         # here, once: fills the git-ignored wheels/ with what that machine lacks
#   bench/gpu.sh                # there, wheels/ carried with the working tree
#   bench/gpu.sh --dry-run      # anywhere, on CPU: the same runs on the tiny job for a few steps (checks the script)
#
# Per model (GPT-2 124M; Pythia-160m: GPT-NeoX 12 x 768), random init, bf16, 32 x 1024 tokens a step, ZeRO-2:
# plain DeepSpeed, xcm's engine and clusterability loss compiled (training.compile, lambda 20; no Ray or MLflow,
# whose overhead bench/throughput.py measures on its own), and a compiled plain PyTorch loop; tokens/s, ratios, MFU
# and peak memory. Then co-clustering 24 GPT-2 MLP-sized matrices (k = 4) with xcm on the GPU and scikit-learn.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$PWD/xcm-runs/gpu-bench}"
REPORT="$OUT/gpu-bench.md"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
mkdir -p "$OUT"

if [[ "${1:-}" == "--dry-run" ]]; then
    MODELS=("gpt2-tiny:model.size=tiny" "gpt_neox-tiny:model.family=gpt_neox model.config.num_hidden_layers=2")
    RUN=(--steps 8 --skip 2 --set resources.gpus_per_worker=0 --set training.micro_batch_size=2)
    MLPS=2
elif [[ -n "${1:-}" ]]; then
    echo "bench/gpu.sh: unknown argument $1; use no argument (on a GPU machine) or --dry-run (on CPU)" >&2
    exit 2
else
    PYTHIA_160M="model.config.num_hidden_layers=12 model.config.hidden_size=768 model.config.num_attention_heads=12"
    PYTHIA_160M+=" model.config.intermediate_size=3072"
    MODELS=("gpt2-124m:model.size=small" "pythia-160m:model.family=gpt_neox model.size=small $PYTHIA_160M")
    RUN=(--steps "${STEPS:-40}" --skip "${SKIP:-15}" --set resources.gpus_per_worker=1
        --set training.micro_batch_size=32 --set data.block_size=1024 --set training.precision=bf16)
    MLPS=24
    if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "bench/gpu.sh: no CUDA GPU visible to $PYTHON; run it on a GPU machine, or bench/gpu.sh --dry-run" >&2
        exit 1
    fi
    if compgen -G "wheels/*.whl" >/dev/null; then  # what the machine lacks, ahead of its own site-packages
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/xcm-site wheels/*.whl
        export PYTHONPATH="$PWD:/tmp/xcm-site"
    fi
fi
if ! "$PYTHON" -c "import deepspeed, pydantic, transformers, sklearn, yaml" 2>"$OUT/imports.log"; then
    echo "bench/gpu.sh: $(tail -1 "$OUT/imports.log"); run bench/gpu_wheels.sh here and carry wheels/" >&2
    exit 1
fi

{
    echo "# xcm GPU benchmark, $(date -u +%Y-%m-%d)"
    echo
    "$PYTHON" -c "import torch; print('-', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', \
'| torch', torch.__version__)"
    echo "- command: bench/gpu.sh ${1:-}"
} >"$REPORT"
for entry in "${MODELS[@]}"; do
    name="${entry%%:*}"
    sets=()
    for setting in ${entry#*:}; do sets+=(--set "$setting"); done
    echo "[gpu.sh] $name" >&2
    "$PYTHON" bench/throughput.py "${RUN[@]}" "${sets[@]}" --set training.compile=true --workers 1 --rounds 1 \
        --variants plain,plain-loss-on,compiled-torch 2>&1 | tee "$OUT/$name.log" | grep '^\[bench\]' >&2 || true
    {
        echo
        echo "## $name"
        echo
        echo '```'
        sed -n '/tokens per step/,$p' "$OUT/$name.log"
        grep 'peak memory' "$OUT/$name.log" || true
        echo '```'
    } >>"$REPORT"
    grep -q 'tokens per step' "$OUT/$name.log" || { echo "bench/gpu.sh: $name failed, see $OUT/$name.log" >&2; exit 1; }
done
echo "[gpu.sh] co-clustering $MLPS matrices" >&2
{
    echo
    "$PYTHON" bench/cocluster.py --gpt2-mlps "$MLPS" --markdown
} >>"$REPORT"
cat "$REPORT"
