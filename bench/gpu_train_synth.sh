#!/usr/bin/env bash
# Train lisa-mobile on the synthetic world on a lent GPU machine (recipes/experiments/synth-gpu.yaml;
# models/lisa-mobile-synth/README.md, item 16), from the repository root there. Such a machine starts
# bare, reaches nothing outside, runs one command for at most 10 minutes and takes at most 64 MiB of
# files per command (the working tree included), so the work is split into verbs that successive
# commands call while the machine stays warm; the training itself runs in the background (setsid)
# between them. Item 16 carried three git-ignored folders, one per command, with the 19 MB
# models/lisa-mobile-synth/delta.safetensors moved aside meanwhile so that each fitted:
#   .gpu1: mobile_sam.pt, NotoColorEmoji.ttf, the gguf and pycocotools wheels       (stage)
#   .gpu2: the first half of the GGUF (split -n 2), the imgviz and cmap wheels      (stage, setup)
#   .gpu3: the second half                                                           (stage, start)
#
#   bash bench/gpu_train_synth.sh stage DIR           # copy one carried folder of files to the staging
#                                                     # area (parts of the base weights, the emoji font,
#                                                     # wheels); may be called several times
#   bash bench/gpu_train_synth.sh setup               # install the staged wheels; write the world in the
#                                                     # background (needs the font)
#   bash bench/gpu_train_synth.sh start END_EPOCH     # join the weight parts into the weights cache,
#                                                     # then in the background: measure the step rate
#                                                     # (30 steps), set optim.total_steps to what ends by
#                                                     # END_EPOCH (seconds since 1970), train, export
#   bash bench/gpu_train_synth.sh follow SECONDS OUT  # show progress for up to SECONDS (returns at once
#                                                     # when the run has ended); into OUT: misc.tar (logs,
#                                                     # TensorBoard events, the export but its delta) and,
#                                                     # once exported, the delta in 15 MiB parts
#   bash bench/gpu_train_synth.sh stop OUT            # end the run now, export its newest checkpoint,
#                                                     # then as follow
#   bash bench/gpu_train_synth.sh measure W [W ...]   # after setup: the recipe with random weights, 40
#                                                     # steps per DataLoader worker count W; prints
#                                                     # samples/s, data_wait and GPU utilisation. Needs
#                                                     # only SmolLM2's tokenizer: a staged folder tok/
#                                                     # holding the cache's tokenizer and config files
#                                                     # and a reasonseg-complete.json listing them
#
# Staged files (any subset per call): mobile_sam.pt, SmolLM2-135M-Instruct.Q4_1.gguf or its .part-*
# pieces, NotoColorEmoji.ttf, *.whl (gguf, pycocotools, imgviz and its cmap, which the GPU image lacks).
# The sha256 of each weight file is checked against reasonseg.weights' registry before it enters the cache.
# Back here: cat OUT/delta.safetensors.part-* > delta.safetensors, then check its sha256 against
# OUT/delta.sha256.
set -u
ST=/tmp/rs
export REASONSEG_HOME=$ST/home REASONSEG_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)/src:$ST/site${PYTHONPATH:+:$PYTHONPATH}"
export REASONSEG_EMOJI_FONT=$ST/parts/NotoColorEmoji.ttf
PY=${PYTHON:-python3}
RS() { $PY -c 'import sys; from reasonseg.cli import main; sys.exit(main())' "$@"; }
RECIPE=${RECIPE:-recipes/experiments/synth-gpu.yaml}
RUN=$($PY -c "import yaml; print(yaml.safe_load(open('$RECIPE'))['train']['output_dir'])")
mkdir -p $ST/parts $ST/home

export_run() {
    rm -rf $ST/export $ST/exported
    RS export $RUN --out $ST/export --delta >$ST/export.log 2>&1 && touch $ST/exported
}

case ${1:-} in
stage)
    cp -rv "$2"/* $ST/parts/
    ;;
setup)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $ST/site $ST/parts/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    $PY -c "import torch, transformers, peft, accelerate, gguf, pycocotools, imgviz; print('torch', torch.__version__, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)" || exit 1
    mkdir -p runs
    [ -e runs/synth ] || ln -s $ST/synth runs/synth
    rm -rf $ST/synth $ST/synth.rc
    setsid bash bench/gpu_train_synth.sh _synth </dev/null >/dev/null 2>&1 &
    echo "world: writing in the background ($ST/synth.log)"
    ;;
start)
    END=$2
    for pair in "mobile_sam mobile_sam.pt" "smollm2_135m_instruct_gguf SmolLM2-135M-Instruct.Q4_1.gguf"; do
        set -- $pair
        mkdir -p $ST/home/$1
        if ls $ST/parts/$2.part-* >/dev/null 2>&1; then cat $ST/parts/$2.part-* >$ST/home/$1/$2
        else cp $ST/parts/$2 $ST/home/$1/$2; fi
    done
    $PY - <<EOF || exit 1
import hashlib
from reasonseg.weights import REGISTRY
from pathlib import Path
for name, f in (("mobile_sam", "mobile_sam.pt"), ("smollm2_135m_instruct_gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")):
    p = Path("$ST/home") / name / f
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    want = REGISTRY[name].sha256
    assert digest == want, f"{p}: sha256 {digest}, registry {want}"
    p.with_name(f + ".sha256").write_text(f"{digest} {p.stat().st_size}\n")
    print("ok", p, p.stat().st_size)
EOF
    setsid bash bench/gpu_train_synth.sh _driver "$END" </dev/null >$ST/driver.log 2>&1 &
    echo "driver started; log $ST/driver.log"
    ;;
_synth)
    RS synth --out $ST/synth --n 1000 --seed 0 --workers 14 >$ST/synth.log 2>&1
    echo $? >$ST/synth.rc
    ;;
_driver)
    END=$2
    while [ ! -e $ST/synth.rc ]; do sleep 2; done
    echo "world rc $(cat $ST/synth.rc): $(tail -n 1 $ST/synth.log)"
    [ "$(cat $ST/synth.rc)" = 0 ] || { touch $ST/done; exit 1; }
    # Probe: 30 steps, to measure the step rate on this machine.
    sed -e "s#output_dir: .*#output_dir: $ST/probe#" $RECIPE >$ST/probe.yaml
    rm -rf $ST/probe  # a scratch run: train refuses to start afresh over old checkpoints
    RS train $ST/probe.yaml --max-steps 30 >$ST/probe.log 2>&1 \
        || { echo "probe failed"; tail -n 30 $ST/probe.log; touch $ST/done; exit 1; }
    RATE=$($PY - <<EOF
import json, statistics, yaml
t = yaml.safe_load(open("$RECIPE"))["train"]
h = json.load(open("$ST/probe/history.json"))
print(statistics.median(r["samples_per_s"] for r in h[10:]) / (t["micro_batch_size"] * t.get("grad_accum", 1)))
EOF
)
    NOW=$(date +%s)
    STEPS=$($PY -c "print(max(100, int($RATE * ($END - $NOW - 60) * 0.92)))")
    echo "probe: median $RATE steps/s after step 10; $((END - NOW)) s left -> total_steps $STEPS"
    sed -e "s/^  total_steps: .*/  total_steps: $STEPS/" $RECIPE >$ST/recipe.yaml
    echo "$STEPS" >$ST/total_steps
    RS train $ST/recipe.yaml >$ST/train.log 2>&1
    echo "train rc $?"
    export_run
    echo "export rc $? $(tail -n 1 $ST/export.log)"
    touch $ST/done
    ;;
follow | stop)
    if [ "$1" = follow ]; then
        OUT=$3
        T0=$SECONDS
        while [ ! -e $ST/done ] && [ $((SECONDS - T0)) -lt "$2" ]; do sleep 5; done
    else
        OUT=$2
        pkill -f "_driver" ; pkill -INT -f "reasonseg.cli" ; sleep 20; pkill -9 -f "reasonseg.cli"
        export_run
        echo "export rc $? $(tail -n 1 $ST/export.log)"
    fi
    mkdir -p "$OUT" $ST/misc
    cat $ST/driver.log
    tail -c 3000 $ST/train.log 2>/dev/null | tr '\r' '\n' | tail -n 5
    for f in driver.log probe.log train.log total_steps export.log synth.log; do [ -e $ST/$f ] && cp $ST/$f $ST/misc/; done
    [ -d $RUN ] && cp -r $RUN/tensorboard $RUN/history.json $ST/misc/ 2>/dev/null
    if [ -e $ST/exported ]; then
        rm -rf $ST/misc/export && mkdir -p $ST/misc/export
        (cd $ST/export && cp $(ls | grep -v '^delta.safetensors$') $ST/misc/export/)
        split -b 15M $ST/export/delta.safetensors "$OUT/delta.safetensors.part-"
        sha256sum $ST/export/delta.safetensors | cut -d' ' -f1 >"$OUT/delta.sha256"
    fi
    tar cf "$OUT/misc.tar" -C $ST misc   # logs, TensorBoard events, history.json, the export but its delta
    ls -la "$OUT"
    ;;
measure)
    shift
    while [ ! -e $ST/synth.rc ]; do sleep 1; done
    echo "world rc $(cat $ST/synth.rc)"
    LM=$ST/home/smollm2_135m_instruct
    [ -e $LM ] || { mkdir -p $LM && cp $ST/parts/tok/* $LM/; }
    for W in "$@"; do
        sed -e "s/load_base_weights: true/load_base_weights: false/; s/num_workers: .*/num_workers: $W/" \
            -e "s#output_dir: .*#output_dir: $ST/w$W#; s/log_every: .*/log_every: 1/" \
            -e "s/head_init_samples: .*/head_init_samples: 0/; s/checkpoint_every: .*/checkpoint_every: 1000/" \
            $RECIPE >$ST/w$W.yaml
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >$ST/util$W.txt &
        SMI=$!
        rm -rf $ST/w$W  # a scratch run, as the probe
        T0=$SECONDS
        timeout 150 $PY -c 'import sys; from reasonseg.cli import main; sys.exit(main())' train $ST/w$W.yaml \
            --max-steps 40 >$ST/w$W.log 2>&1
        echo "workers $W: rc $? wall $((SECONDS - T0)) s"
        kill $SMI
        $PY - <<EOF
import json, statistics as st
t = json.load(open("$ST/w$W/history.json"))[5:]
u = [float(x) for x in open("$ST/util$W.txt").read().split()]
print(f"  steps 6-{len(t) + 5}: median {st.median(x['samples_per_s'] for x in t):.1f} samples/s, median "
      f"data_wait {st.median(x['data_wait'] for x in t):.3f} (max {max(x['data_wait'] for x in t):.3f}); "
      f"GPU utilisation: mean {st.mean(u):.0f}% over {len(u)} readings")
EOF
    done
    ;;
*)
    echo "usage: $0 stage DIR | setup | start END_EPOCH | follow SECONDS OUT | stop OUT | measure W..." >&2
    exit 2
    ;;
esac
