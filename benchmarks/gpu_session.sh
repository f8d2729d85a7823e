#!/usr/bin/env bash
# The GPU checks of pretraining in one call, for a session that is lent a GPU for a few minutes:
#
#   OUT=bench-results/gpu benchmarks/gpu_session.sh [TOKENS_DIR]
#
# 1. tests/test_model.py on this machine (its loss test also runs on the GPU);
# 2. bench_train.py --gpu --quick: the GPU path end to end on a tiny GPT-2, seconds;
# 3. the gpt2-124m preset, compile + bf16, micro-batch 16: ours vs transformers, and where our GPU time goes;
#    with BASELINE_TREE=dir (a copy of an older nanoforge/ package's parent), that tree's model at batch 16 too;
# 4. ours alone at micro-batch 32;
# 5. with TOKENS_DIR: `nanoforge pretrain --preset gpt2-124m --parallel fsdp` under torchrun for a few steps.
# Figures land in $OUT (JSON lines, the pretrain metrics); the last lines printed are the summary.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench-results/gpu}
PY=${PYTHON:-python3}
TOKENS=${1:-}
mkdir -p "$OUT"
summary=()
run() {  # run NAME CMD...: print, time, remember the outcome
    local name=$1 t0=$SECONDS
    shift
    echo "=== $name"
    "$@"
    local rc=$?
    summary+=("$name: rc $rc, $((SECONDS - t0)) s")
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cuda', torch.version.cuda)"
run "tests/test_model.py" timeout 180 $PY -m pytest -q -x -p no:cacheprovider tests/test_model.py
run "quick" $PY benchmarks/bench_train.py --gpu --quick --device cuda --out "$OUT/bench_train.jsonl" || exit 1
run "gpt2-124m b16" $PY benchmarks/bench_train.py --gpu --batch 16 --kernels 25 --out "$OUT/bench_train.jsonl"
if [ -n "${BASELINE_TREE:-}" ]; then
    run "baseline b16" env PYTHONPATH="$BASELINE_TREE" \
        $PY benchmarks/bench_train.py --gpu --batch 16 --sides ours --out "$OUT/bench_train_baseline.jsonl"
fi
run "gpt2-124m b32" $PY benchmarks/bench_train.py --gpu --batch 32 --sides ours --out "$OUT/bench_train.jsonl"
if [ -n "$TOKENS" ]; then
    rm -rf /tmp/nanoforge-gpu-pretrain
    run "pretrain fsdp" timeout 300 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m nanoforge \
        pretrain --data "$TOKENS" --out /tmp/nanoforge-gpu-pretrain --preset gpt2-124m --parallel fsdp \
        --max-steps 12 --set eval_every=12 --set sample_every=12 --set ckpt_every=12
    cp /tmp/nanoforge-gpu-pretrain/metrics.jsonl "$OUT/pretrain_metrics.jsonl" 2>/dev/null
    cp /tmp/nanoforge-gpu-pretrain/manifest.json "$OUT/pretrain_manifest.json" 2>/dev/null
fi
echo "=== summary"
printf '%s\n' "${summary[@]}"
$PY - "$OUT"/bench_train*.jsonl <<'EOF'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        for side, x in r["results"].items():
            print(f"{path.rsplit('/', 1)[-1]:28s} b{r['shape']['batch']:<3} {side:13s} {x['tok_s']:>10.0f} tok/s  "
                  f"MFU {x['mfu']:.1%}  peak {x['peak_memory_gb']} GB  compiled in {x['compile_s']} s"
                  + ("  (--quick)" if r["quick"] else ""))
EOF
