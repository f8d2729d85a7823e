#!/usr/bin/env bash
# The GPU checks of pretraining in one call, for a session that is lent a GPU for a few minutes:
#
#   OUT=bench-results/gpu benchmarks/gpu_session.sh [TOKENS_DIR]
#
# 1. the gpt2-124m preset as pretrain runs it (bench_train.py --gpu: compile + bf16, the preset's
#    micro-batch 32, accumulation over the 524,288-token batch): ours vs transformers, and where one
#    step's GPU time goes; with BASELINE_TREE=dir (the parent of an older nanoforge/ package), that tree's;
# 2. ours alone at micro-batch 64 (where one step's time goes), then settings to compare there: CUDA
#    graphs, the flash attention backend instead of cuDNN's, larger loss chunks; CUDA graphs at the
#    preset's micro-batch 32; then, if two or more of those settings helped at 64, all of them together;
# 3. the model tests that run on each device (the loss on the GPU: compiled chunk, padded vocabulary,
#    dw accumulated inside the matmul when eager; a compiled tiny GPT-2 against the eager one): they
#    passed on an H100 in the last two sessions, so they come after the figures the 45% target needs;
#    then the preset with its batches on the host, copied per micro-batch from pinned memory (as pretrain
#    does now) and from pageable memory (as it did before);
# 4. with TOKENS_DIR: `nanoforge pretrain --preset gpt2-124m` for 12 steps, one process (PARALLEL=fsdp or
#    ddp: under torchrun on one GPU instead; PRETRAIN_FLAGS: more flags, e.g. "--set compile_mode=…");
# 5. max-autotune (Triton matmuls with fused epilogues) and Inductor's coordinate descent tuning (its
#    compile took > 150 s), at micro-batch 64.
# Each run has its own time limit and the script starts no run after BUDGET seconds (default 560), so one
# call leaves room on a 15-minute device lease; what ran is in $OUT (session.log: everything printed;
# JSON lines; the pretrain metrics) and the last lines printed are the summary. On an H100 (2026-11) the
# device tests took 104 s and each plain compile ~30 s.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench-results/gpu}
PY=${PYTHON:-python3}
TOKENS=${1:-}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1  # everything printed also comes back as a file, whole
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
BUDGET=${BUDGET:-560}
left() { echo $((BUDGET - SECONDS)); }
bench() {  # bench NAME LIMIT ARGS...: one bench_train.py --gpu run, if the budget still allows LIMIT/2
    local name=$1 limit=$2
    shift 2
    if [ "$(left)" -lt $((limit / 2)) ]; then
        summary+=("$name: not run, $(left) s left")
        return 1
    fi
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    run "$name" timeout "$limit" $PY benchmarks/bench_train.py --gpu "$@"
}
bench "gpt2-124m" 150 --kernels 30 --out "$OUT/bench_train.jsonl"
if [ -n "${BASELINE_TREE:-}" ]; then
    PYTHONPATH="$BASELINE_TREE" bench "baseline" 90 --sides ours --out "$OUT/bench_train_baseline.jsonl"
fi
b64=(--batch 64 --sides ours --out "$OUT/bench_train.jsonl")
bench "micro-batch 64" 100 "${b64[@]}" --kernels 30
bench "micro-batch 64, CUDA graphs" 150 "${b64[@]}" --cudagraphs
bench "micro-batch 64, flash attention" 80 "${b64[@]}" --sdpa flash
bench "micro-batch 64, loss chunks of 2^29" 80 "${b64[@]}" --loss-chunk-elements 536870912
bench "micro-batch 32, CUDA graphs" 150 --batch 32 --sides ours --out "$OUT/bench_train.jsonl" --cudagraphs
# every setting that beat plain micro-batch 64 by more than 0.5%, together: the gains may only reach the
# target in combination (printed: how many settings helped, then their flags)
combined=($($PY - "$OUT/bench_train.jsonl" <<'PYEOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
runs = [r for r in runs if r["shape"]["batch"] == 64 and "ours" in r["results"] and not r["quick"]]
tok_s = lambda r: r["results"]["ours"]["tok_s"]
base = [r for r in runs if not r.get("knobs") and r["compile"] is True]
helped = []
for r in runs if base else []:
    knobs = r.get("knobs") or {}
    if tok_s(r) <= 1.005 * tok_s(base[-1]):
        continue
    if r["compile"] == "reduce-overhead" and not knobs:
        helped.append(["--cudagraphs"])
    elif r["compile"] is True and list(knobs) == ["sdpa"]:
        helped.append(["--sdpa", knobs["sdpa"]])
    elif r["compile"] is True and list(knobs) == ["loss_chunk_elements"]:
        helped.append(["--loss-chunk-elements", str(knobs["loss_chunk_elements"])])
print(len(helped), *[flag for flags in helped for flag in flags])
PYEOF
))
if [ "${combined[0]:-0}" -ge 2 ]; then
    bench "micro-batch 64, combined: ${combined[*]:1}" 150 "${b64[@]}" "${combined[@]:1}"
else
    summary+=("micro-batch 64, combined: not run (${combined[0]:-no} setting(s) helped: ${combined[*]:1})")
fi
if [ "$(left)" -ge 120 ]; then
    run "tests/test_model.py" timeout "$(( $(left) < 180 ? $(left) : 180 ))" $PY -m pytest -q -x -p no:cacheprovider \
        --noconftest tests/test_model.py -k "each_device and cuda"  # the loss, the compiled model, batches
else
    summary+=("tests/test_model.py: not run, $(left) s left")
fi
b32host=(--batch 32 --sides ours --out "$OUT/bench_train.jsonl" --host-data)
bench "micro-batch 32, batches copied from pinned memory" 80 "${b32host[@]}" pinned
bench "micro-batch 32, batches copied from pageable memory" 80 "${b32host[@]}" pageable
if [ -n "$TOKENS" ]; then
    rm -rf /tmp/nanoforge-gpu-pretrain
    launch=($PY)
    [ -n "${PARALLEL:-}" ] && launch=($PY -m torch.distributed.run --standalone --nproc-per-node 1)
    run "pretrain ${PARALLEL:-1 process}" timeout 240 "${launch[@]}" -m nanoforge pretrain --data "$TOKENS" \
        --out /tmp/nanoforge-gpu-pretrain --preset gpt2-124m ${PARALLEL:+--parallel $PARALLEL} --max-steps 12 \
        --set eval_every=12 --set sample_every=12 --set ckpt_every=12 ${PRETRAIN_FLAGS:-}
    cp /tmp/nanoforge-gpu-pretrain/metrics.jsonl "$OUT/pretrain_metrics.jsonl" 2>/dev/null
    cp /tmp/nanoforge-gpu-pretrain/manifest.json "$OUT/pretrain_manifest.json" 2>/dev/null
fi
bench "micro-batch 64, max-autotune" 200 "${b64[@]}" --compile-mode max-autotune-no-cudagraphs
bench "micro-batch 64, coordinate descent" 200 "${b64[@]}" --inductor coordinate_descent_tuning=1
echo "=== summary"
printf '%s\n' "${summary[@]}"
$PY - "$OUT" <<'EOF'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_train*.jsonl")):
    for line in open(path):
        r = json.loads(line)
        for side, x in r["results"].items():
            print(f"{path.rsplit('/', 1)[-1]:28s} b{r['shape']['batch']:<3}×{r['shape'].get('accum', 1):<3} {side:13s} {x['tok_s']:>10.0f} tok/s  "
                  f"MFU {x['mfu']:.1%}  peak {x['peak_memory_gb']} GB  compiled in {x['compile_s']} s"
                  + f"  {r['compile'] if r['compile'] is not True else ''} {r.get('knobs') or ''}"
                  + ("  (--quick)" if r["quick"] else ""))
EOF
