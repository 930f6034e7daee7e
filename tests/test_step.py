"""One golden first step: the loss, the gradient norm and a few parameter values after one train
step from fixed seeds (float32, on the CPU), for the plain model and for LoRA adapters.

The values were recorded from the code before the layout refactor and reproduced after it. A
failure means the numbers a run produces changed: if that was intended (a new init, another
dropout stream, a changed optimizer), say so in the commit and record the new values printed in
the failure message; if not, the change broke training's arithmetic.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import parse_args
from jaxgpt.model import model_config
from jaxgpt.step import init_state, make_train_step

# loss, grad_norm, h.1.attn.c_attn.kernel[0, :3], wte.embedding[5, :3], h.0.mlp.c_fc.bias[:3]
GOLDEN = (3.150787353515625, 1.3740118741989136,
          [-0.020854024216532707, -0.013492652215063572, -0.038528021425008774],
          [0.01175256073474884, -0.038488198071718216, 0.0070748282596468925],
          [-0.0009999913163483143, 0.0009999239118769765, 0.0009999927133321762])
# LoRA rank 4: loss, grad_norm (adapters only), h.0.attn.c_attn.lora_b[0, :3]
GOLDEN_LORA = (3.1485118865966797, 0.46204960346221924,
               [0.0009999132016673684, 0.000999785028398037, 0.0009998342720791698])


def first_step(lora_rank=0):
    cfg = parse_args(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                      "--dropout=0.1", "--bias=True", "--learning_rate=1e-3", "--warmup_iters=0",
                      "--dtype=float32", "--attn_impl=explicit", "--seed=0"]).validate()
    mcfg = dataclasses.replace(model_config(cfg, 23, log=lambda s: None), lora_rank=lora_rank)
    graphdef, state, opt = init_state(mcfg, cfg, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (1, 4, 16), 0, 23)
    return make_train_step(graphdef, opt, cfg)(state, (x, jnp.roll(x, -1, -1)), jax.random.key(2))


def check(got, want, what):
    msg = (f"{what} after one step changed: got {got}, recorded {want}. If the change is intended, "
           f"record the new values in tests/test_step.py and say why in the commit")
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=2e-5, atol=1e-7,
                               err_msg=msg)


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.slow
def test_golden_first_step(lora_rank):
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        state, m = first_step(lora_rank)
    p = state.params
    if lora_rank == 0:
        loss, norm, *values = GOLDEN
        got = [p["h"][1]["attn"]["c_attn"]["kernel"][0, :3], p["wte"]["embedding"][5, :3],
               p["h"][0]["mlp"]["c_fc"]["bias"][:3]]
    else:
        loss, norm, *values = GOLDEN_LORA
        got = [p["h"][0]["attn"]["c_attn"]["lora_b"][0, :3]]
    check([float(m["loss"]), float(m["grad_norm"])], [loss, norm], "the loss and gradient norm")
    for g, w in zip(got, values):
        check(g, w, "a parameter")
