"""The laptop recipe: shakespeare_char shrunk to train on a CPU in minutes.

Same as configs/shakespeare_char.py except a 4-layer, 4-head, 128-channel model with a
context of 64 and batches of 12, no dropout (the model is too small to overfit in 2000
iterations), and fewer eval batches.
"""
out_dir = "out-shakespeare-char-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
