"""Finetune OpenAI's GPT-2 on the BPE-tokenized tiny Shakespeare (nanoGPT's finetune_shakespeare).

    python train.py --config configs/finetune_shakespeare.py
    python sample.py --out_dir=out-shakespeare --start="ROMEO:"

init_from takes any GPT-2 source: gpt2 (downloaded once into the Hugging Face cache), gpt2-xl as
nanoGPT uses, a local Hugging Face directory (--init_from=path/to/gpt2), or a nanoGPT ckpt.pt. The
data is encoded with the model's own BPE files when the source carries them.
"""
out_dir = "out-shakespeare"
init_from = "gpt2"
dataset = "shakespeare"  # tiny Shakespeare, downloaded on first use (or --input_file=PATH)
tokenizer = "gpt2"

eval_interval = 5
eval_iters = 40
log_interval = 1

# 1 x 32 x 1024 = 32,768 tokens per step; the first evaluation is the pretrained model's loss
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024
max_iters = 20

# finetune at a small constant learning rate
learning_rate = 3e-5
decay_lr = False
