#!/usr/bin/env bash
# Sampling speed of jaxgpt's engine and nanoGPT's loop (torch_reference.py), interleaved so that
# machine drift hits both alike: ROUNDS x (bench.py --sample_tokens, torch_reference.py --sample-tokens).
# Both are steady state: the time of N new tokens minus that of N/10, 5 samples, a 1-token prompt.
#   bash scripts/sampling_side_by_side.sh [ROUNDS] [BLOCK] [N] [--window_keep=K ...]
set -euo pipefail
rounds=${1:-3}
block=${2:-256}
n=${3:-200}
shift $(( $# < 3 ? $# : 3 ))
ref=${TORCH_REFERENCE:-../shared/bench/torch_reference.py}
text=${TEXT:-../shared/data/tinyshakespeare.txt}
date -u
echo "model: 4 layers, 4 heads, 128 channels, vocab 65, block $block; 5 samples x $n new tokens $*"
for i in $(seq "$rounds"); do
  jax=$(python bench.py --config configs/shakespeare_char_cpu.py --block_size="$block" --sample_tokens="$n" "$@" \
        | tail -1 | python -c "import json,sys; print(round(json.load(sys.stdin)['steady_tokens_per_s']))")
  torch=$(python "$ref" --text "$text" --iters 50 --block "$block" --eval-iters 1 --sample-tokens "$n" \
          | tail -1 | python -c "import json,sys; print(json.load(sys.stdin)['sample_tokens_per_s'])")
  echo "round $i: jaxgpt $jax tokens/s, nanoGPT loop $torch tokens/s, ratio $(python -c "print(round($jax / $torch, 1))")"
done
