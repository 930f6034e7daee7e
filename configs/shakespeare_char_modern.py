"""The modern GPU recipe: configs/shakespeare_char.py's baby GPT (6 layers, 6 heads, 384 channels,
context 256, batch 64, dropout 0.2) with the speedrun's changes, aimed at val 1.47 (the classic GPU
recipe's best) in half its time. Not yet measured on a GPU: see README "Time to quality".

Rotary positions, RMSNorm, QK-norm, a ReLU^2 MLP, an untied head, zero-initialised output
projections; Muon for the blocks' matrices, AdamW for the rest; short warmup, the peak held, then
a linear cooldown over the last 40% of 2500 iterations (the classic recipe runs 5000).
"""
out_dir = "out-shakespeare-char-modern"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # the baby GPT overfits Shakespeare: keep the classic recipe's regularisation

pos_emb = "rope"
norm = "rmsnorm"
qk_norm = True
mlp = "relu2"
untied_head = True
zero_init_proj = True

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 3e-3  # AdamW: embeddings, head, norms
max_iters = 2500
lr_decay_iters = 2500
min_lr = 0.0
lr_schedule_kind = "trapezoid"
cooldown_frac = 0.4
beta2 = 0.99
warmup_iters = 50
weight_decay = 0.0
