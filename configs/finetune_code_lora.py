"""LoRA-finetune OpenAI's GPT-2 on your own code: a directory of source files, BPE-tokenized.

    python train.py --config configs/finetune_code_lora.py --input_file=path/to/your/repo
    python sample.py --out_dir=out-code-lora --start="def " --temperature=0.7
    python export.py --out_dir=out-code-lora --hf_dir=gpt2-code   # adapters merged into the weights

Only rank-8 adapters on every attention and MLP projection train (1.18 M, 0.95% of GPT-2 124M); the
base stays frozen and out of the checkpoints, which hold the adapters and a reference to the base.
A GPT-2 directory, a nanoGPT ckpt.pt or a jaxgpt out_dir work as init_from too.
"""
out_dir = "out-code-lora"
init_from = "gpt2"
finetune_method = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05

dataset = "code"  # prepared into data/code on first use
tokenizer = "gpt2"
include = "**/*.py"  # the files to learn from (comma-separated globs); hidden directories are skipped
exclude = "venv/**,**/site-packages/**,build/**,data/**"

block_size = 512
batch_size = 8
gradient_accumulation_steps = 4

max_iters = 500
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
lr_decay_iters = 500
weight_decay = 0.0
eval_interval = 50
eval_iters = 20
log_interval = 10
