"""Shared test helpers that are not fixtures: nanoGPT's model and its checkpoint files.

`NanoGPT` is nanoGPT's model.py GPT (the attention written out, as nanoGPT does without flash
attention: the same function), the reference forward for jaxgpt's import of nanoGPT checkpoints.
`write_nanogpt_run` writes ckpt.pt the way nanoGPT's train.py saves it and meta.pkl the way its
data/shakespeare_char/prepare.py does, so tests read exactly what a nanoGPT user has on disk."""

from __future__ import annotations

import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: an optional bias (PyTorch's has none to switch off)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias, mask_buffer):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd
        if mask_buffer:  # nanoGPT registers it when flash attention is missing (PyTorch < 2.0)
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool)).logical_not(), float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()  # exact (erf) GELU, as nanoGPT
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias, mask_buffer):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, bias, mask_buffer)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: wte tied to lm_head; the state dict has nanoGPT's names."""

    def __init__(self, n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout=0.0, mask_buffer=False):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(n_embd, n_head, block_size, bias, mask_buffer) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        """Logits at every position, (B, T) -> (B, T, V) (nanoGPT's inference forward keeps only the last)."""
        pos = torch.arange(idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate_greedy(self, idx, max_new_tokens):
        """nanoGPT's generate with the argmax instead of a draw: the context cropped to block_size."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
            idx = torch.cat((idx, self(idx_cond)[:, -1, :].argmax(-1, keepdim=True)), dim=1)
        return idx


def random_nanogpt(seed=0, **model_args) -> NanoGPT:
    """A NanoGPT with every tensor random (LayerNorms too, so a mixed-up name cannot pass unnoticed),
    at scales that make logits differ clearly between tokens (no near-ties for greedy decoding)."""
    torch.manual_seed(seed)
    model = NanoGPT(**model_args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            ln = ".ln_" in name
            p.copy_(torch.randn_like(p) * (0.3 if ln else 0.15) + (1.0 if ln and name.endswith("weight") else 0.0))
    return model


def nanogpt_meta(text: str) -> dict:
    """meta.pkl's dict as nanoGPT's data/shakespeare_char/prepare.py builds it."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    return {"vocab_size": len(chars), "itos": itos, "stoi": stoi}


def write_meta_pkl(path, meta: dict) -> None:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(meta, f)


def write_nanogpt_run(out_dir, text: str, *, n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False,
                      compiled=False, mask_buffer=False, dataset="shakespeare_char", seed=0):
    """out_dir/ckpt.pt as nanoGPT's train.py saves it for a character model of `text`'s characters
    (config/train_shakespeare_char.py's settings, a smaller model), and returns (model, meta) with
    meta as prepare.py builds it (written nowhere: tests put meta.pkl where they need it).
    compiled: the model was torch.compile'd, so its state dict names start with `_orig_mod.`."""
    meta = nanogpt_meta(text)
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=meta["vocab_size"], dropout=0.2)
    model = random_nanogpt(seed, mask_buffer=mask_buffer, **model_args)
    # configure_optimizers: AdamW, weight decay on the 2-D tensors only; one step so it has state
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))
    saved = model
    if compiled:  # what nanoGPT saves: raw_model = model (the compiled wrapper) -> '_orig_mod.' names
        saved = torch.compile(model)
    state = {k: v.clone() for k, v in saved.state_dict().items()}  # the step below must not change them
    model.train()
    loss = model(torch.zeros(1, 4, dtype=torch.long)).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the saved weights are the model's: undo the step
        own = saved.state_dict()
        for k, v in state.items():
            own[k].copy_(v)
    model.eval()
    config = dict(out_dir=str(out_dir), eval_interval=250, log_interval=10, eval_iters=200, eval_only=False,
                  always_save_checkpoint=False, init_from="scratch", wandb_log=False, wandb_project="shakespeare-char",
                  wandb_run_name="mini-gpt", dataset=dataset, gradient_accumulation_steps=1, batch_size=64,
                  block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.2, bias=bias,
                  learning_rate=1e-3, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                  decay_lr=True, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4, backend="nccl",
                  device="cpu", dtype="float32", compile=compiled)
    checkpoint = {"model": saved.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                  "iter_num": 250, "best_val_loss": torch.tensor(1.4697), "config": config}
    os.makedirs(out_dir, exist_ok=True)
    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    return model, meta
