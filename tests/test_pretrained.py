"""Parity with the reference implementations: Hugging Face GPT-2 (transformers) and nanoGPT's
checkpoint format, in and out. Offline: every model is a small random one built here."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# test dependencies (pyproject's `test` extra): missing, they fail the run rather than skip these tests
import torch
import transformers

from helpers import NANOGPT_CTX, nanogpt_ckpt
from jaxgpt import pretrained
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig, build_model

V, T_CTX = 97, 32
assert NANOGPT_CTX == T_CTX  # nanogpt_ckpt's mask buffers have this model's context
# logits are compared with transformers' float32 ones at 1e-4: float32 compute, exact matmuls
pytestmark = pytest.mark.usefixtures("exact_f32")


def random_hf_model(activation="gelu_new", seed=0):
    """A small GPT-2 with every tensor random (biases and LayerNorms too, so none can be skipped)."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T_CTX, n_embd=32, n_layer=2, n_head=4,
                                  activation_function=activation, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "ln_" in name else 0.1) + (1.0 if name.endswith("ln_1.weight") else 0.0))
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(idx))).logits.numpy()


def idx(T=T_CTX, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (2, T), 0, V))


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model()


@pytest.mark.slow
def test_hf_safetensors_dir_gives_the_same_logits(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    model, cfg = pretrained.load_pretrained(str(tmp_path), dtype="float32")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.gelu) == (2, 4, 32, V, T_CTX, "tanh")
    x = idx()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), hf_logits(hf_model, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_hf_pytorch_model_bin_gives_the_same_logits(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = pretrained.load_pretrained(str(tmp_path), dtype="float32")
    x = idx(seed=2)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), hf_logits(hf_model, x), atol=1e-4, rtol=0)


def test_nanogpt_ckpt_gives_the_same_logits(tmp_path):
    ref = random_hf_model(activation="gelu", seed=3)  # nanoGPT's GELU is the exact one
    nanogpt_ckpt(ref, tmp_path / "ckpt.pt")
    for source in (tmp_path / "ckpt.pt", tmp_path):  # the file, or the out_dir holding it
        model, cfg = pretrained.load_pretrained(str(source), dtype="float32")
        assert cfg.gelu == "exact" and cfg.bias
        x = idx(seed=4)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), hf_logits(ref, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias,gelu", [(False, "exact"), (True, "tanh")])
@pytest.mark.slow
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, bias, gelu):
    cfg = ModelConfig(vocab_size=V, block_size=T_CTX, n_layer=2, n_head=4, n_embd=32, bias=bias, gelu=gelu)
    model = build_model(cfg, seed=5)
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pretrained.export_hf(params, cfg, str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = idx(seed=6)
    np.testing.assert_allclose(hf_logits(hf, x), np.asarray(model(jnp.asarray(x))), atol=1e-4, rtol=0)
    # and back: the exported directory loads into the same model
    again, _ = pretrained.load_pretrained(str(tmp_path), dtype="float32")
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(x))), np.asarray(model(jnp.asarray(x))), atol=1e-6)


def test_block_size_crops_the_context(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    params, cfg, _ = pretrained.load_params(str(tmp_path), block_size=8)
    assert cfg.block_size == 8 and params["wpe"]["embedding"].shape == (8, 32)
    with pytest.raises(UserError, match="larger than"):
        pretrained.load_params(str(tmp_path), block_size=64)


def test_unknown_sources_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="neither scratch"):
        pretrained.load_weights(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no GPT-2 weights"):
        pretrained.load_weights(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only GPT-2"):
        pretrained.load_weights(str(tmp_path))


def test_gpt2_name_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="could not download gpt2 .*--init_from=PATH"):
        pretrained.load_weights("gpt2")


def test_gpt2_name_reads_the_hub_cache(monkeypatch, tmp_path, hf_model):
    """A name resolves through huggingface_hub's cache lookup first (no network needed)."""
    import huggingface_hub

    hf_model.save_pretrained(tmp_path)
    calls = []

    def cached(repo, allow_patterns=None, local_files_only=False):
        calls.append((repo, local_files_only))
        if not local_files_only:
            raise AssertionError("tried the network although the cache has it")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    w = pretrained.load_weights("gpt2-medium")
    assert calls == [("openai-community/gpt2-medium", True)] and w.source == "gpt2-medium"
    np.testing.assert_array_equal(w.tensors["wte.weight"], hf_model.transformer.wte.weight.detach().numpy())
