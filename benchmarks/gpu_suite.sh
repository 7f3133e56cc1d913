#!/usr/bin/env bash
# The benchmarks to run on a lent H100/H200 in one go (about 8 minutes): writes benchmarks/results/*_cuda.md.
#   bash benchmarks/gpu_suite.sh                 on the GPU
#   bash benchmarks/gpu_suite.sh --tiny          the same commands on the CPU at toy sizes (tests run this)
#   bash benchmarks/gpu_suite.sh --out=DIR       write the tables to DIR instead
# Each step has its own time limit, so one slow step cannot eat the others' time; a failed or cut step is
# reported at the end and makes the exit status 1, the other tables are still written.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
out=benchmarks/results
for arg in "$@"; do
    case "$arg" in
        --tiny) mode=tiny ;;
        --out=*) out="${arg#--out=}" ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option '$arg' (expected --tiny, --out=DIR or --help)" >&2; exit 2 ;;
    esac
done
lm_variants=gpt2,aot_mhsa,aot_mssa,crate_alpha,bilateral
if [ "$mode" = gpu ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_suite.sh: no CUDA device here (run with --tiny on a CPU)" >&2; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    device=cuda
    # GPT-2-124M shape, bf16, eager and compiled
    train=(--width 768 --heads 12 --depth 12 --vocab gpt2 --seq-len 1024 --batch 8 --dtype bfloat16
           --modes eager,compiled --repeats 5 --matmul-size 8192)
    attention=(--widths 768:12 --seq-lens 1024,4096,16384 --tokens-per-batch 65536 --dtype bfloat16 --flex --repeats 5)
    graph=(--sizes 512,1024,2048,4096 --repeats 3)
    decode=(--width 768 --heads 12 --depth 12 --vocab gpt2 --batches 1,8 --new-tokens 128 --repeats 2)  # x2: both caches
    limits=(240 150 90 120)
else
    device=cpu
    lm_variants=gpt2,bilateral
    train=(--width 32 --heads 2 --depth 1 --seq-len 16 --batch 2 --modes eager,compiled --compile-backend aot_eager
           --repeats 1 --matmul-size 128 --no-count-flops)
    attention=(--widths 16:2 --seq-lens 16 --tokens-per-batch 32 --repeats 1)
    graph=(--sizes 32,64 --repeats 1 --warmup 0 --quick)
    decode=(--width 32 --heads 2 --depth 1 --batches 1 --prompt 3 --new-tokens 4 --repeats 1)
    limits=(240 120 120 120)
fi
failed=()
step() {  # step LIMIT_S MODULE ARGS...
    local limit=$1 module=$2
    shift 2
    echo "== $module $*" >&2
    timeout "$limit" python -m "$module" --device "$device" "$@" --out "$out" || failed+=("$module (exit $?)")
}
step "${limits[0]}" benchmarks.lm_throughput --variants "$lm_variants" "${train[@]}"
step "${limits[1]}" benchmarks.attention_throughput "${attention[@]}"
step "${limits[2]}" benchmarks.graph_restoration "${graph[@]}"
step "${limits[3]}" benchmarks.lm_decoding --variants "$lm_variants" "${decode[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_suite.sh: failed or cut at its time limit: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_suite.sh: tables in $out" >&2
