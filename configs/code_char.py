"""A character-level model of Python code, trained here: the base for finetune_code_lora_char.py.

    python train.py --config configs/code_char.py --input_file=path/to/a/python/tree

Any directory of .py files works (the README's measurement used the sources of jax, flax and
optax from a virtual environment). The laptop recipe's model on code instead of Shakespeare.
"""
out_dir = "out-code-char"
dataset = "code_char"
tokenizer = "char"
include = "**/*.py"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
dropout = 0.0

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
cpu_devices = 2
