#!/usr/bin/env bash
# The GPU evidence of the kernels issue in stages that each fit one 10-minute command on a lent H100/H200 (the
# device tool: carry `.whl`, see README "GPU evidence"). Results land in $OUT (default eval/results/gpu), named
# after the device; commit the ones worth keeping under eval/results/ with the device in the name.
#
#   bash eval/gpu_evidence.sh setup tests     # install (no network: wheels in .whl/), kernel tests on CUDA
#   bash eval/gpu_evidence.sh kernels         # bench_kernels --quick: SDPA, QuantizedCache
#   bash eval/gpu_evidence.sh tune            # bench_kernels --tune (tile sizes, warps, stages, splits)
#   bash eval/gpu_evidence.sh decode          # bench_decode at 32k, batch 1 and 8, with the GPU busy time
#   bash eval/gpu_evidence.sh setup issues    # issues 13-16 in ~6 min: gpu_issue_checks.py (issue 14 configs, KVzip
#                                             # and per-head decode at 16k, low-bit kernels at 32k), the CUDA tests
#                                             # `tests` leaves out, a bf16 soak of tests/test_matrix.py on CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-eval/results/gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # kvpress from this tree (no build step needed offline)
device="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else "none")')"

for stage in "$@"; do
  echo "== $stage ($device) $(date -u +%H:%M:%S)"
  case "$stage" in
    setup)  # the image has torch/triton; transformers and quanto come as wheels (nothing can be fetched there)
      "$PY" -m pip install -q --no-deps .whl/*.whl
      "$PY" -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
      ;;
    tests)  # twins vs Triton on the real GPU, the fused paths end to end
      "$PY" -m pytest -q -x tests/test_kernels_*.py tests/test_quant_kernel.py 2>&1 | tail -20 | tee "$OUT/tests_$device.txt"
      ;;
    kernels)
      "$PY" eval/bench_kernels.py --quick --tag "quick_$device"
      cp eval/results/kernels_quick_"$device".* "$OUT"/
      ;;
    tune)
      "$PY" eval/bench_kernels.py --tune --quick --tag "tune_$device"
      cp eval/results/kernels_tune_"$device".json "$OUT"/
      ;;
    decode)
      "$PY" eval/bench_decode.py --contexts 32768 --batches 1 8 --prefill-chunk 8192 --profile \
        --out "$OUT/decode_e2e_${device}_32k.json"
      ;;
    issues)  # each part records its own failure and the next one runs
      # timings of issues 14-16 -> JSON (rewritten after each step; cut at 330 s so the rest still fits 10 minutes);
      # the summary on stdout, tqdm's progress (and any traceback) in a file
      progress="$OUT/issue_checks_${device}_log.txt"
      timeout 330 "$PY" eval/gpu_issue_checks.py --out "$OUT/issue_checks_$device.json" 2> "$progress" \
        || { echo "gpu_issue_checks.py: rc $? (124: cut at 330 s)"; tail -c 1500 "$progress"; }
      # the suite's CUDA tests that `tests` leaves out (kernel tests in bf16 and fp16 are in `tests`)
      "$PY" -m pytest -q -rf tests/test_paged_pool.py tests/test_quant_lowbit.py 2>&1 | tail -15 \
        | tee "$OUT/tests_issues_$device.txt" || echo "CUDA tests failed (rc $?)"
      # the soak: seeded cases, every one in bf16 on CUDA, cut at 150 s (per-case lines survive the cut)
      log="$OUT/matrix_bf16_$device.txt"
      KVPRESS_MATRIX_CASES="${MATRIX_CASES:-80}" KVPRESS_MATRIX_SEED="${MATRIX_SEED:-0}" timeout 150 \
        "$PY" -m pytest -o addopts= -v -rf --maxfail=5 tests/test_matrix.py > "$log" 2>&1 \
        || echo "matrix soak: rc $? (124: cut at 150 s)"
      echo "matrix soak (bf16, CUDA): $(grep -cE '::[^ ]+ PASSED' "$log") passed," \
        "$(grep -cE '::[^ ]+ (FAILED|ERROR)' "$log") failed; $log"
      grep -E "^(FAILED|ERROR)" "$log" | cut -c1-300 | head -5 || true
      ;;
    *)
      echo "unknown stage $stage (setup, tests, kernels, tune, decode, issues)" >&2
      exit 2
      ;;
  esac
done
