"""LoRA-finetune the character model of configs/code_char.py on your own repository.

    python train.py --config configs/code_char.py --input_file=path/to/a/python/tree    # the base
    python train.py --config configs/finetune_code_lora_char.py --input_file=path/to/your/repo

The new corpus is encoded with the base model's characters (characters it never saw are dropped,
and the count is printed). Compare with full finetuning on the same data:
    python train.py --config configs/finetune_code_lora_char.py --input_file=... \
        --finetune_method=full --out_dir=out-code-full
"""
out_dir = "out-code-lora-char"
init_from = "out-code-char"
finetune_method = "lora"
lora_rank = 8
lora_alpha = 16.0

dataset = "my_code_char"
tokenizer = "char"
include = "**/*.py"
exclude = "venv/**,**/site-packages/**,build/**,data/**"

block_size = 64
batch_size = 12
dropout = 0.0

max_iters = 300
learning_rate = 2e-3
decay_lr = False
weight_decay = 0.0
eval_interval = 50
eval_iters = 20
log_interval = 25
cpu_devices = 2
