"""The lecture's bigram baseline on tiny shakespeare: a 65 x 65 table of next-char logits.

It has no context beyond one character, so block_size only sets the training window;
it learns fast with a high learning rate and needs no weight decay or dropout.
"""
out_dir = "out-bigram-shakespeare"
eval_interval = 500
eval_iters = 50
log_interval = 100

dataset = "shakespeare_char"
model_type = "bigram"
batch_size = 32
block_size = 8

learning_rate = 1e-2
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-3
warmup_iters = 100
weight_decay = 0.0
beta2 = 0.99
