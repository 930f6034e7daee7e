"""Reproduce GPT-2 (124M) on OpenWebText-like text: nanoGPT's train_gpt2 recipe.

Prepare the corpus first (a directory of text files, e.g. OpenWebText extracted to .txt):
    python -m jaxgpt.prepare --tokenizer=gpt2 --input /path/to/openwebtext --data_dir data/openwebtext
then: python train.py --config configs/train_gpt2.py   (8 x A100 40GB took nanoGPT about 4 days)

~0.5M tokens per step: 12 sequences x 1024 tokens x 40 accumulation steps = 491,520. With several
devices the batch of 12 is split across them (pass a batch_size divisible by the device count).
"""
out_dir = "out-gpt2"
dataset = "openwebtext"
tokenizer = "gpt2"  # BPE; the vocabulary is padded from 50257 to 50304 when training from scratch

model_size = "gpt2"  # 12 layers, 12 heads, n_embd 768
block_size = 1024
dropout = 0.0
bias = False

batch_size = 12
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
beta2 = 0.95
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
log_interval = 10
