"""The GPU recipe for a small character-level Shakespeare model (nanoGPT's shakespeare_char).

Differs from the defaults: a "baby GPT" (6 layers, 6 heads, 384 channels, context 256) that
overfits easily, hence dropout 0.2, a high learning rate and beta2 0.99 for the small batch.
"""
out_dir = "out-shakespeare-char"
eval_interval = 250  # evaluate often: we expect to overfit
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # only the best val loss matters for sampling

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # with baby networks we can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit bigger because the number of tokens per iter is small
warmup_iters = 100
