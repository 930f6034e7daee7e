#!/usr/bin/env bash
# Training-step speed of jaxgpt and the PyTorch reference, interleaved so that machine drift
# hits both alike: ROUNDS x (bench.py, torch_reference.py). Prints each run's ms/iter.
#   bash scripts/side_by_side.sh [ROUNDS] [CONFIG] [--key=value ...]
set -euo pipefail
rounds=${1:-3}
config=${2:-configs/shakespeare_char_cpu.py}
shift $(( $# < 2 ? $# : 2 ))
ref=${TORCH_REFERENCE:-../shared/bench/torch_reference.py}
text=${TEXT:-../shared/data/tinyshakespeare.txt}
date -u
for i in $(seq "$rounds"); do
  jax_ms=$(python bench.py --config "$config" --steps=100 "$@" | tail -1 | python -c "import json,sys; print(round(json.load(sys.stdin)['ms_per_iter'], 2))")
  torch_ms=$(python "$ref" --text "$text" --iters 200 --eval-every 0 --eval-iters 1 | tail -1 | python -c "import json,sys; print(json.load(sys.stdin)['ms_per_iter'])")
  echo "round $i: jaxgpt $jax_ms ms/iter, torch $torch_ms ms/iter, ratio $(python -c "print(round($torch_ms / $jax_ms, 3))")"
done
