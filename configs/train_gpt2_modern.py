"""GPT-2 (124M) size with the modern recipe (README "Time to quality"): the speedrun's model and
optimizer changes on configs/train_gpt2.py's data and batch (~0.5M tokens per step). Not measured
here (no GPU was lent); the learning rates follow the modded-nanogpt / nanochat range.

Prepare the corpus as for configs/train_gpt2.py, then: python train.py --config configs/train_gpt2_modern.py
"""
out_dir = "out-gpt2-modern"
dataset = "openwebtext"
tokenizer = "gpt2"

model_size = "gpt2"  # 12 layers, 12 heads, n_embd 768
block_size = 1024
dropout = 0.0
bias = False

pos_emb = "rope"
norm = "rmsnorm"
qk_norm = True
mlp = "relu2"
untied_head = True
logit_softcap = 15.0
zero_init_proj = True

batch_size = 12
gradient_accumulation_steps = 5 * 8

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 3e-3  # AdamW: embeddings, head, norms
beta1 = 0.8
beta2 = 0.95
weight_decay = 0.0
max_iters = 6000  # ~3B tokens: the speedrun reaches val 3.28 on FineWeb in well under 1B
lr_decay_iters = 6000
min_lr = 0.0
warmup_iters = 100
lr_schedule_kind = "trapezoid"
cooldown_frac = 0.4

eval_interval = 500
eval_iters = 200
log_interval = 10
