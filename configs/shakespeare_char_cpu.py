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

# Split the CPU into 2 JAX devices and train data parallel over them: for a model this small,
# one core per half-batch beats spreading every op over both cores (measured 1.3-1.4x on a
# 2-core machine). Set it to your core count if batch_size divides by it; ignored on GPUs.
cpu_devices = 2
