#!/usr/bin/env bash
# One prepared GPU session: the checks the accelerator issues ask for, in one call, each part
# under its own time limit, with a summary at the end. Run from the repository root on a machine
# with an NVIDIA GPU and jax[cuda], torch and transformers installed (not run yet: no GPU was lent
# to the session that wrote it).
#   bash scripts/gpu_check.sh OUT_DIR [suite] [recipe] [speed]   # logs and summary.txt go to OUT_DIR
# The parts' limits add up to more than one 10-minute device call: run `suite recipe` in one
# call and `speed` in the next if need be. The corpus and the PyTorch reference default to
# ../shared; where that is not beside the checkout, copy them in and set TEXT= and TORCH_REFERENCE=.
set -uo pipefail
out=${1:-gpu-check}
shift || true
parts=${*:-suite recipe speed}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
text=${TEXT:-../shared/data/tinyshakespeare.txt}
ref=${TORCH_REFERENCE:-../shared/bench/torch_reference.py}
py=${PYTHON:-python3}
cache="$out/xla-cache"
summary="$out/summary.txt"
touch "$summary"
note() { echo "$*" | tee -a "$summary"; }
part() {  # part NAME SECONDS COMMAND...: runs it, logs to $out/NAME.log, notes exit code and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  note "$name: exit $? in $((SECONDS - t0)) s"
}

note "$(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
suite() {  # the whole test suite on the GPU
  part pytest 300 "$py" -m pytest -x -q -p no:cacheprovider
  tail -1 "$out/pytest.log" | tee -a "$summary"
}

recipe() {  # the GPU recipe with no flags (dtype=auto: bf16, attention auto), then sample.py twice
  part shakespeare_char 200 "$py" train.py --config configs/shakespeare_char.py --input_file="$text" \
      --compile_cache="$cache"
  grep -E "^iter [0-9]+: train loss|^done" "$out/shakespeare_char.log" | tail -2 | tee -a "$summary"
  for i in 1 2; do  # the second run should find its programs in the compilation cache
    part "sample_$i" 60 "$py" sample.py --out_dir=out-shakespeare-char --num_samples=5 --max_new_tokens=500 \
        --compile_cache="$cache"
    grep "^generated" "$out/sample_$i.log" | tee -a "$summary"
  done
}

speed() {  # GPT-2 124M step, jaxgpt and PyTorch (torch.compile, bf16) side by side, B=12 and B=32
  for b in 12 32; do
    part "bench_b$b" 120 "$py" bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 \
        --vocab_size=50304 --batch_size="$b" --steps=30 --compile_cache="$cache"
    grep "ms/iter" "$out/bench_b$b.log" | tee -a "$summary"
    part "torch_b$b" 180 "$py" "$ref" --device cuda --compile --dtype bfloat16 --vocab 50304 --batch "$b" \
        --block 1024 --layers 12 --heads 12 --d 768 --iters 50 --eval-iters 2
    tail -1 "$out/torch_b$b.log" | tee -a "$summary"
  done
}

for p in $parts; do
  case $p in
    suite|recipe|speed) "$p" ;;
    *) echo "error: unknown part '$p'; use suite, recipe or speed" >&2; exit 2 ;;
  esac
done
