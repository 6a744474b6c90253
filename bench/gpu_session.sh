#!/usr/bin/env bash
# Everything this project measures and checks on a lent GPU, in one command (a lease is short and a
# fresh machine is bare): run from the repository root on the GPU machine.
#
#   bash bench/gpu_session.sh [OUTDIR [GROUP]]   # default OUTDIR: ./out/gpu; GROUP: all, bench or train
#
# A device call runs at most 10 minutes, so a lease takes two calls: GROUP "bench" (steps 1-3, about
# 5 minutes on an H100) and GROUP "train" (step 4, about 1 minute).
#
# Python packages: the machine's own python3 with torch; anything it lacks (segment-anything, the
# reference for the ViT-H comparison; bitsandbytes, for 8-bit/4-bit) is looked for in .whl/site (an
# unpacked site folder, git-ignored), then in the environment. To make .whl/site where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes segment-anything
#   for w in .whl/*.whl; do unzip -q -o "$w" -d .whl/site; done; rm .whl/*.whl
# and keep only the CUDA build of bitsandbytes' library that the GPU's torch uses
# (libbitsandbytes_cuda130.so for torch+cu130) when the upload has a size limit.
#
# Steps, each under its own time limit, each one's log under OUTDIR; a failed step is reported and the
# next one still runs; the exit status counts failures:
#   0. tests/test_gpu_graph.py (marker gpu, skipped without CUDA): the CUDA-graph decoding path
#   1. smoke: bench_gpu_lisa7b.py on tiny shapes on the GPU (fp32: the uncached loop, the eager cache
#      and the CUDA-graph cache must give the same tokens)
#   2. bench_gpu_lisa7b.py at full size (LISA-7B layout, bf16): the KV cache (eager steps, CUDA graph)
#      vs the original uncached loop, teacher-forced eval at batch 1 and 16, memory per option (bf16 /
#      8-bit / 4-bit); its section goes to OUTDIR/BENCHMARKS.md
#   3. bench_sam_encoder.py --model vit_h --compile: SAM ViT-H ours (eager, and compiled) vs Meta's
#      segment-anything, bf16; likewise appended
#   4. training under accelerate FSDP (one process, bf16) on the tiny model, with a checkpoint, then
#      --resume to a later step
set -u
OUTDIR=${1:-out/gpu}
GROUP=${2:-all}
case $GROUP in all | bench | train) ;; *) echo "GROUP must be all, bench or train, got '$GROUP'" >&2; exit 2 ;; esac
mkdir -p "$OUTDIR"
ROOT=$(pwd)
export PYTHONPATH="$ROOT/src:$ROOT/tests:$ROOT/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
FAILED=()

step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUTDIR/$name.log"
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc $rc)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
$PY -c "import bitsandbytes, segment_anything; print('bitsandbytes', bitsandbytes.__version__, '| segment_anything ok')"

if [ "$GROUP" != train ]; then
step gpu-tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py  # the GPU image lacks some test deps
step smoke 120 $PY bench/bench_gpu_lisa7b.py --tiny --device cuda --dtype fp32 --repeats 1 --new-tokens 8 \
    --no-sam --no-append
step lisa7b 360 $PY bench/bench_gpu_lisa7b.py --device cuda --dtype bf16 --repeats 5 --no-sam \
    --benchmarks-file "$OUTDIR/BENCHMARKS.md"
step sam 200 $PY bench/bench_sam_encoder.py --model vit_h --device cuda --dtype bf16 --repeats 10 \
    --compile --benchmarks-file "$OUTDIR/BENCHMARKS.md"
fi

if [ "$GROUP" != bench ]; then
# FSDP on one GPU: the tiny lisa-mobile model (LLaMA-style decoder layers) on the toy samples.
FS=$(mktemp -d)  # outside OUTDIR: only logs and tables land there
mkdir -p "$FS"
sed -e 's/^num_processes: .*/num_processes: 1/' recipes/accelerate/fsdp.yaml >"$FS/accelerate.yaml"
cat >"$FS/recipe.yaml" <<EOF
model: {preset: lisa-mobile, tiny: true}
data:
  datasets: [{kind: callable, target: "train_support:toy_dataset", options: {n: 8}}]
  collate: "train_support:collator_for"
freeze: {train_projector: true}
optim: {lr: 1.0e-3, warmup_steps: 1, total_steps: 4}
train: {output_dir: $FS/run, micro_batch_size: 2, checkpoint_every: 2, progress_bar: false}
EOF
sed -e 's/total_steps: 4/total_steps: 6/' "$FS/recipe.yaml" >"$FS/recipe-more.yaml"
LAUNCH=($PY -m accelerate.commands.launch --config_file "$FS/accelerate.yaml" -m reasonseg.cli train)
step fsdp-train 150 "${LAUNCH[@]}" "$FS/recipe.yaml"
step fsdp-resume 120 "${LAUNCH[@]}" "$FS/recipe-more.yaml" --resume
find "$FS/run" -maxdepth 3 | sort >"$OUTDIR/fsdp-files.txt"
cp "$FS/run/history.json" "$OUTDIR/fsdp-history.json" 2>/dev/null
fi

echo "failed steps: ${FAILED[*]:-none}"
exit "${#FAILED[@]}"
