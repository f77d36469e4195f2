#!/usr/bin/env bash
# The one GPU check: build the CUDA kernels, run the GPU tests, run the
# benchmarks, and leave logs + results under $OUT (default ./out).
#
#   bash scripts/gpu_check.sh                 # everything
#   GPU_CHECK_SKIP_BENCH=1 bash scripts/gpu_check.sh
#   GPU_CHECK_SKIP_TESTS=1 GPU_CHECK_BENCHMARKS="benchmarks/attention.py benchmarks/e2e.py" bash scripts/gpu_check.sh
#
# The whole script takes ~12 minutes on an H100; split it where one command is capped at 10.
#
# To add a step, append to GPU_TESTS (pytest paths, run with -m gpu) or
# BENCHMARKS (scripts that take --out DIR). Keep what lands in $OUT to a few
# files: the build and test logs at the top; the benchmark results ($OUT/bench)
# and their logs end up in one archive, $OUT/bench.tar.
set -u
cd "$(dirname "$0")/.."

GPU_TESTS=(tests/gpu)
BENCHMARKS=(benchmarks/kernels.py benchmarks/dense_gemv.py benchmarks/attention.py benchmarks/e2e.py)
BENCHMARKS+=(benchmarks/quantize.py)  # GPTQ time of Mistral-7B-shaped blocks (quantization helper)
# Real vLLM side by side on a full 7B (only where vLLM is installed: see README, "vLLM on the GPU").
if ${PYTHON:-python3} -c "import vllm" >/dev/null 2>&1; then BENCHMARKS+=(benchmarks/vllm_gpu_7b.py); fi
# Narrow a run: GPU_CHECK_TESTS="tests/gpu/test_kernels_gpu.py" GPU_CHECK_BENCHMARKS="benchmarks/kernels.py"
[ -n "${GPU_CHECK_TESTS:-}" ] && read -r -a GPU_TESTS <<<"$GPU_CHECK_TESTS"
[ -n "${GPU_CHECK_BENCHMARKS:-}" ] && read -r -a BENCHMARKS <<<"$GPU_CHECK_BENCHMARKS"

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/bench"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export ZEPHYR_PLUGINS_NO_ENTRYPOINTS=1
# Build for the card at hand only (the general default is 80;89;90a).
export ZEPHYR_CUDA_ARCHS=${ZEPHYR_CUDA_ARCHS:-90a}
export ZEPHYR_KERNEL_CACHE=${ZEPHYR_KERNEL_CACHE:-$PWD/.cache/zephyr_kernels}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0
# The commit the results are filed under. Pass ZEPHYR_GIT_COMMIT: a tree copied to another machine may
# carry a stale .git (one run here read its HEAD as the previous commit). Without it, git's HEAD, marked
# "+modified" where the tracked files differ from it.
if [ -z "${ZEPHYR_GIT_COMMIT:-}" ]; then
  ZEPHYR_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ "$ZEPHYR_GIT_COMMIT" != unknown ] && ! git diff --quiet HEAD -- . 2>/dev/null; then
    ZEPHYR_GIT_COMMIT="$ZEPHYR_GIT_COMMIT+modified"
    echo "warning: the tracked files differ from git's HEAD; results are filed as $ZEPHYR_GIT_COMMIT" >&2
  fi
fi
export ZEPHYR_GIT_COMMIT

{
  echo "== $(date -u +%FT%TZ) gpu_check"
  nvidia-smi -L || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/build.log"

echo "== build kernels (ZEPHYR_CUDA_ARCHS=$ZEPHYR_CUDA_ARCHS)" | tee -a "$OUT/build.log"
start=$(date +%s)
ZEPHYR_KERNEL_VERBOSE=1 $PY -c "
from zephyr_plugins.kernel_build import ensure_built
ok, why = ensure_built()
print('kernels built:', ok, why or '')
raise SystemExit(0 if ok else 1)
" >>"$OUT/build.log" 2>&1 || status=1
echo "build took $(( $(date +%s) - start )) s, status $status" | tee -a "$OUT/build.log"
grep -E "error|warning: .*spill|kernels built" "$OUT/build.log" | head -20

if [ $status -eq 0 ]; then
  if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
    echo "== gpu tests: ${GPU_TESTS[*]}"
    $PY -m pytest -m gpu -p no:cacheprovider -q -rfE --durations=5 "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
  if [ -z "${GPU_CHECK_SKIP_BENCH:-}" ]; then
    for b in "${BENCHMARKS[@]}"; do
      name=$(basename "$b" .py)
      echo "== benchmark $b"
      $PY "$b" --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_$name.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  fi
fi
# One archive of the benchmark results and their logs: a lent device returns at most 8 files from
# $OUT, and bench/ alone holds more (GPU_CHECK_NO_PACK=1 keeps the files as they are).
if [ -z "${GPU_CHECK_NO_PACK:-}" ] && [ -d "$OUT/bench" ]; then
  (cd "$OUT" && tar cf bench.tar bench $(ls bench_*.log 2>/dev/null) && rm -rf bench bench_*.log) &&
    echo "== results packed into $OUT/bench.tar (tar xf to read them)"
fi
echo "== gpu_check done, status $status"
exit $status
