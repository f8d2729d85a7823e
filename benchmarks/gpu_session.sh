#!/usr/bin/env bash
# The GPU checks of pretraining in one call, for a session that is lent a GPU for a few minutes:
#
#   OUT=bench-results/gpu benchmarks/gpu_session.sh [TOKENS_DIR]
#
# 1. the model tests that run on each device (the loss on the GPU: compiled chunk, padded vocabulary);
# 2. the gpt2-124m preset as pretrain runs it (bench_train.py --gpu: compile + bf16, micro-batch 32,
#    accumulation over the 524,288-token batch): ours vs transformers, and where one step's GPU time goes;
#    with BASELINE_TREE=dir (the parent of an older nanoforge/ package), that tree's model too;
# 3. ours alone at micro-batch 16 and 64, and at 32 with CUDA graphs;
# 4. with TOKENS_DIR: `nanoforge pretrain --preset gpt2-124m` for 12 steps, one process (PARALLEL=fsdp or
#    ddp: under torchrun on one GPU instead).
# Figures land in $OUT (JSON lines, the pretrain metrics); the last lines printed are the summary.
# On an H100 (2026-11) steps 1-4 took about 6 minutes, each compile ~30 s; the CUDA-graph run comes last
# because it compiles longest (it did not finish inside a 450 s call then). Give the call 600 s.
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
run "tests/test_model.py" timeout 180 $PY -m pytest -q -x -p no:cacheprovider --noconftest tests/test_model.py \
    -k each_device
run "gpt2-124m b32" $PY benchmarks/bench_train.py --gpu --kernels 25 --out "$OUT/bench_train.jsonl"
if [ -n "${BASELINE_TREE:-}" ]; then
    run "baseline b32" env PYTHONPATH="$BASELINE_TREE" \
        $PY benchmarks/bench_train.py --gpu --batch 32 --sides ours --out "$OUT/bench_train_baseline.jsonl"
fi
for b in 16 64; do
    run "gpt2-124m b$b" $PY benchmarks/bench_train.py --gpu --batch $b --sides ours --out "$OUT/bench_train.jsonl"
done
if [ -n "$TOKENS" ]; then
    rm -rf /tmp/nanoforge-gpu-pretrain
    launch=($PY)
    [ -n "${PARALLEL:-}" ] && launch=($PY -m torch.distributed.run --standalone --nproc-per-node 1)
    run "pretrain ${PARALLEL:-1 process}" timeout 240 "${launch[@]}" -m nanoforge pretrain --data "$TOKENS" \
        --out /tmp/nanoforge-gpu-pretrain --preset gpt2-124m ${PARALLEL:+--parallel $PARALLEL} --max-steps 12 \
        --set eval_every=12 --set sample_every=12 --set ckpt_every=12
    cp /tmp/nanoforge-gpu-pretrain/metrics.jsonl "$OUT/pretrain_metrics.jsonl" 2>/dev/null
    cp /tmp/nanoforge-gpu-pretrain/manifest.json "$OUT/pretrain_manifest.json" 2>/dev/null
fi
run "gpt2-124m b32 cudagraphs" timeout 150 $PY benchmarks/bench_train.py --gpu --batch 32 --sides ours --cudagraphs \
    --out "$OUT/bench_train_cudagraphs.jsonl"
echo "=== summary"
printf '%s\n' "${summary[@]}"
$PY - "$OUT"/bench_train*.jsonl <<'EOF'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        for side, x in r["results"].items():
            print(f"{path.rsplit('/', 1)[-1]:28s} b{r['shape']['batch']:<3}×{r['shape'].get('accum', 1):<3} {side:13s} {x['tok_s']:>10.0f} tok/s  "
                  f"MFU {x['mfu']:.1%}  peak {x['peak_memory_gb']} GB  compiled in {x['compile_s']} s"
                  + ("  (--quick)" if r["quick"] else ""))
EOF
