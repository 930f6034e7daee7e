"""Evaluate OpenAI's GPT-2 (124M) on a prepared GPT-2-tokenized corpus, no training (nanoGPT's
eval_gpt2). Other sizes: --init_from=gpt2-medium | gpt2-large | gpt2-xl.

    python train.py --config configs/eval_gpt2.py --data_dir=data/openwebtext
"""
out_dir = "out-eval-gpt2"
init_from = "gpt2"
eval_only = True
dataset = "openwebtext"
tokenizer = "gpt2"
block_size = 1024
batch_size = 8
eval_iters = 500
