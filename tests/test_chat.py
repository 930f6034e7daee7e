"""Chat: the template and its loss mask, conversation JSONL (bad lines named file:line), prepare --chat,
batches that carry the mask, the masked loss against NumPy (masked tokens get no gradient), windows
over long conversations, the embedding grown for the template's tokens, finetuning from a modern run,
a capability test (reversal learned to >= 90% exact on held-out words), sample.py --chat."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpe_fixture import train_tiny_bpe
from conftest import make_corpus
from helpers import run_script
from jaxgpt import chat
from jaxgpt.data import get_batch, load_chat_split
from jaxgpt.errors import UserError
from jaxgpt.head import head_loss
from jaxgpt.loading import grow_vocab
from jaxgpt.prepare import prepare_chat
from jaxgpt.tokenizer import BPETokenizer, CharTokenizer

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "ok", "weight": 0}]


def write_jsonl(path, convs, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def reversal_set(n, seed=0):
    r = random.Random(seed)
    words = sorted({"".join(r.choice("abcdefgh") for _ in range(r.randint(3, 6))) for _ in range(n)})
    r.shuffle(words)
    return words


def reversal_conv(w):
    return [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]


# ----------------------------------------------------------------------------- the template


def test_char_template_renders_turns_and_masks_the_assistant_only():
    tmpl = chat.Template.new(CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?"))
    ids, mask = tmpl.render(CONV)
    t = tmpl.ids
    assert ids[0] == t["bos"] and ids.count(t["end"]) == 5
    # the only trained tokens: the first assistant's "yo" and its <|end|> (the second has weight 0)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tmpl.encode("yo") + [t["end"]]
    assert tmpl.decode(ids) == "be briefhiyook?ok"
    assert tmpl.prompt(CONV[:2])[-1] == t["assistant"]
    # reserved characters come after the vocabulary (it stays sorted) and cannot be smuggled in as content
    chars = tmpl.tokenizer.chars
    assert chars == sorted(chars) and len(chars) == tmpl.vocab_size == 28 + 5
    assert tmpl.encode("a" + chars[t["end"]] + "b") == tmpl.encode("ab")


def test_bpe_template_takes_the_ids_after_the_encoding_and_round_trips_through_meta():
    tok = BPETokenizer(train_tiny_bpe(make_corpus(), n_merges=50))
    tmpl = chat.Template.new(tok)
    assert tmpl.ids["bos"] == tok.eot
    assert sorted(tmpl.ids[r] for r in ("system", "user", "assistant", "end")) == list(range(tok.vocab_size,
                                                                                            tok.vocab_size + 4))
    meta = json.loads(json.dumps(tmpl.meta()))  # as meta.json and a checkpoint store it
    again = chat.Template.from_meta(meta)
    assert again.ids == tmpl.ids and again.vocab_size == tok.vocab_size + 4
    assert again.render(CONV) == tmpl.render(CONV)
    # text that spells a special token is plain text, not the token
    assert tmpl.ids["end"] not in tmpl.encode("<|end|>") and "<|end|>" in tmpl.decode(tmpl.encode("<|end|>"))
    assert chat.plain_meta(meta) == tok.meta()
    with pytest.raises(UserError, match="not trained on conversations"):
        chat.Template.from_meta(tok.meta())


def test_fit_keeps_the_newest_turns_and_the_system_message():
    tmpl = chat.Template.new(CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?"))
    msgs = [{"role": "system", "content": "sys"}] + [{"role": r, "content": "x" * 10}
                                                    for r in ("user", "assistant") * 3][:-1]
    ids, dropped = tmpl.fit(msgs, 40)
    assert len(ids) <= 40 and dropped == 3 and ids[:2] == [tmpl.ids["bos"], tmpl.ids["system"]]
    with pytest.raises(UserError, match="more than the 5"):
        tmpl.fit(msgs, 5)


# ----------------------------------------------------------------------------- JSONL and prepare --chat


@pytest.mark.parametrize("line, why", [
    ("{not json", "not JSON"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}', "no content"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ('{"text": "x"}', '"messages" list'),
])
def test_a_bad_line_is_named_by_file_and_line_and_can_be_skipped(tmp_path, line, why):
    path = write_jsonl(tmp_path / "c.jsonl", [reversal_conv("abc")] * 3, [line, json.dumps({"messages": CONV})])
    with pytest.raises(UserError, match=rf"c.jsonl:4: .*{why}.*--skip_bad_lines=True"):
        chat.read_conversations([path])
    got = chat.read_conversations([path], skip_bad=True)
    assert len(got.items) == 4 and len(got.bad) == 1 and got.bad[0].split(": ")[0].endswith("c.jsonl:4")


def test_prepare_chat_writes_tokens_masks_and_the_template(tmp_path):
    words = reversal_set(200)
    path = write_jsonl(tmp_path / "c.jsonl", [reversal_conv(w) for w in words], ["oops"])
    with pytest.raises(UserError, match=f"c.jsonl:{len(words) + 1}: not JSON"):
        prepare_chat(path, str(tmp_path / "d"), verbose=False)
    meta = prepare_chat(path, str(tmp_path / "d"), val_fraction=0.1, skip_bad_lines=True, verbose=False)
    assert meta["conversations"] == len(words) and meta["skipped_lines"] == 1
    tmpl = chat.Template.from_meta(meta)
    n_val = round(0.1 * len(words))
    for split, convs in (("train", words[:-n_val]), ("val", words[-n_val:])):
        tokens = np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=meta["dtype"])
        mask = np.fromfile(tmp_path / "d" / f"{split}_mask.bin", dtype=np.uint8)
        ids, m = chat.encode_conversations([reversal_conv(w) for w in convs], tmpl, meta["dtype"])
        np.testing.assert_array_equal(tokens, ids)
        np.testing.assert_array_equal(mask, m)
        assert meta[f"{split}_assistant_tokens"] == int(mask.sum()) == sum(len(w) + 1 for w in convs)
    # too few conversations to split: the text data's check
    with pytest.raises(UserError, match="too few to split"):
        prepare_chat(write_jsonl(tmp_path / "one.jsonl", [reversal_conv("abc")]), str(tmp_path / "e"), verbose=False)


def test_prepare_cli_chat_errors_are_one_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [reversal_conv("abc")] * 5, ['{"messages": []}'])
    r = run_script("-m", "jaxgpt.prepare", "--chat", f"--input={path}", f"--data_dir={tmp_path / 'd'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "c.jsonl:6" in r.stderr, r.stderr
    r = run_script("-m", "jaxgpt.prepare", "--chat", f"--input={path}", f"--data_dir={tmp_path / 'd'}",
                   "--skip_bad_lines=True")
    assert r.returncode == 0 and "skipped 1 bad line" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- batches and windows


def test_batches_start_at_conversations_and_carry_the_mask(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [reversal_conv(w) for w in reversal_set(300)])
    meta = prepare_chat(path, str(tmp_path / "d"), verbose=False)
    tokens, mask, starts, long = load_chat_split(str(tmp_path / "d"), "train", meta, 16)
    assert long == 0 and np.all(tokens[starts] == meta["chat"]["ids"]["bos"])
    for data, m, st in ((tokens, mask, starts), (jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(starts))):
        x, y = get_batch(jax.random.key(3), data, 8, 16, m, st)
        x, y = np.asarray(x), np.asarray(y)
        assert np.all(x[:, 0] == meta["chat"]["ids"]["bos"])
        # y is the next token where the mask says so, else -1
        off = np.asarray(starts)[np.asarray(jax.random.randint(jax.random.key(3), (8,), 0, len(starts)))]
        want = tokens[off[:, None] + np.arange(1, 17)].astype(np.int32)
        np.testing.assert_array_equal(y, np.where(mask[off[:, None] + np.arange(1, 17)] > 0, want, -1))
        assert (y >= 0).any() and (y < 0).any()


def test_a_long_conversation_is_split_at_user_turns():
    tmpl = chat.Template.new(CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz"))
    turns = [m for w in ("abcdefgh", "ijklmnop", "qrstuvwx") for m in reversal_conv(w)]
    ids, _ = tmpl.render(turns)
    short, _ = tmpl.render(reversal_conv("ab"))
    tokens = np.asarray(ids + short)
    starts, long = chat.windows(tokens, tmpl.meta(), 24)
    users = [i for i, t in enumerate(ids) if t == tmpl.ids["user"]]
    assert long == 1 and list(starts) == [0, users[1], users[2], len(ids)]
    starts, long = chat.windows(tokens, tmpl.meta(), 200)
    assert long == 0 and list(starts) == [0, len(ids)]


# ----------------------------------------------------------------------------- the masked loss


def numpy_masked_loss(h, w, y):
    logits = (h.reshape(-1, h.shape[-1]).astype(np.float64) @ w.T.astype(np.float64))
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = y.reshape(-1)
    keep = y >= 0
    return -logp[np.flatnonzero(keep), y[keep]].sum() / keep.sum()


@pytest.mark.parametrize("tc", [None, 3])  # the plain head, and the chunked one (custom_vjp)
def test_masked_loss_is_numpys_and_masked_positions_get_no_gradient(tc, exact_f32):
    rng = np.random.default_rng(0)
    B, T, C, V = 2, 8, 16, 11
    h = rng.standard_normal((B, T, C)).astype(np.float32)
    w = rng.standard_normal((V, C)).astype(np.float32) * 0.3
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    y[0, :5] = -1  # a hand-made mask: the first row's first five targets, the second row's last two
    y[1, 6:] = -1
    f = lambda h, w: head_loss(h, w, jnp.asarray(y), tied=True, tc=tc, masked=True)  # noqa: E731
    loss, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    assert float(loss) == pytest.approx(numpy_masked_loss(h, w, y), rel=1e-5)
    dh = np.asarray(dh)
    assert np.all(dh[y < 0] == 0) and np.all(np.abs(dh[y >= 0]).sum(-1) > 0)
    # the gradient is the one of NumPy's loss too (finite differences on one weight)
    eps, e = 1e-3, np.zeros_like(w)
    e[2, 3] = eps
    fd = (numpy_masked_loss(h, w + e, y) - numpy_masked_loss(h, w - e, y)) / (2 * eps)
    assert float(dw[2, 3]) == pytest.approx(fd, rel=1e-3, abs=1e-6)
    # with no target masked it is the plain mean; with every one masked, 0 and no gradient
    full = jnp.asarray(np.abs(y))
    plain = head_loss(jnp.asarray(h), jnp.asarray(w), full, tied=True, tc=tc)
    assert float(head_loss(jnp.asarray(h), jnp.asarray(w), full, tied=True, tc=tc, masked=True)) == \
        pytest.approx(float(plain), rel=1e-6)
    none = jnp.full((B, T), -1, jnp.int32)
    l0, g0 = jax.value_and_grad(lambda h: head_loss(h, jnp.asarray(w), none, tied=True, tc=tc, masked=True))(
        jnp.asarray(h))
    assert float(l0) == 0 and not np.asarray(g0).any()


@pytest.mark.slow
def test_fully_masked_rows_add_nothing_to_the_models_gradient():
    """Through the whole model: a batch whose second row is all masked has the gradient of the first row
    alone under the plain loss (rows are independent), so masked tokens contribute nothing."""
    from flax import nnx

    from jaxgpt.model import ModelConfig, build_model
    from jaxgpt.step import make_loss_fn

    cfg = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
    graphdef, params = nnx.split(build_model(cfg, 0), nnx.Param)
    params = nnx.to_pure_dict(params)
    x = jax.random.randint(jax.random.key(1), (2, 8), 0, 13)
    y = jnp.roll(x, -1, axis=1)
    masked = y.at[1].set(-1)
    g_masked = jax.grad(make_loss_fn(graphdef, masked=True))(params, x, masked)
    g_row0 = jax.grad(make_loss_fn(graphdef))(params, x[:1], y[:1])
    for a, b in zip(jax.tree.leaves(g_masked), jax.tree.leaves(g_row0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # and the targets behind the mask do not matter at all
    g_other = jax.grad(make_loss_fn(graphdef, masked=True))(params, x.at[1].set(0), masked)
    for a, b in zip(jax.tree.leaves(g_masked), jax.tree.leaves(g_other)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grown_vocab_keeps_the_old_rows_and_is_the_same_every_time():
    params = {"wte": {"embedding": np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)},
              "lm_head": {"kernel": np.ones((4, 10), np.float32)}}
    a, b = grow_vocab(params, 16), grow_vocab(params, 16)
    assert a["wte"]["embedding"].shape == (16, 4) and a["lm_head"]["kernel"].shape == (4, 16)
    np.testing.assert_array_equal(a["wte"]["embedding"][:10], params["wte"]["embedding"])
    np.testing.assert_array_equal(a["wte"]["embedding"], b["wte"]["embedding"])
    assert len({tuple(r) for r in a["wte"]["embedding"][10:]}) == 6  # distinct rows
    assert grow_vocab(params, 8) is params


# ----------------------------------------------------------------------------- training (slow)


def train_args(out_dir, data_dir, input_file, **kw):
    base = dict(out_dir=out_dir, data_dir=data_dir, input_file=input_file, n_layer=2, n_head=2, n_embd=32,
                block_size=32, batch_size=4, eval_iters=2, eval_interval=5, log_interval=5, max_iters=5,
                warmup_iters=1, lr_decay_iters=5, learning_rate=1e-2, min_lr=1e-3, dropout=0.0)
    return [f"--{k}={v}" for k, v in {**base, **kw}.items()]


MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", untied_head=True, qk_norm=True)


@pytest.mark.slow  # four short runs
def test_full_lora_and_qlora_chat_finetunes_start_from_a_modern_run(tmp_path, corpus_file):
    from jaxgpt.config import parse_args
    from jaxgpt.loading import load
    from jaxgpt.trainer import train

    convs = write_jsonl(tmp_path / "c.jsonl", [reversal_conv(w) for w in reversal_set(60)])
    train(parse_args(train_args(tmp_path / "base", tmp_path / "text", corpus_file, **MODERN)), log=lambda s: None)
    _, _, base_cfg, base_tok, _ = load(str(tmp_path / "base"))
    for method in ("full", "lora", "qlora"):
        lines = []
        out = train(parse_args(train_args(tmp_path / method, tmp_path / f"chat_{method}", convs, chat=True,
                                          init_from=tmp_path / "base", finetune_method=method)), log=lines.append)
        assert np.isfinite(out["val_loss"])
        assert any("the base's embedding grows from" in line for line in lines)  # a char base: no room for the template
        assert any("loss is over the assistant's tokens only" in line for line in lines)
        _, params, cfg, _, meta = load(str(tmp_path / method))
        assert cfg.non_gpt2_options() == base_cfg.non_gpt2_options() and cfg.lora_rank == 0
        tmpl = chat.Template.from_meta(meta["tokenizer"])
        assert cfg.vocab_size == tmpl.vocab_size == base_tok.vocab_size + 5
        assert params["lm_head"]["kernel"].shape == (32, cfg.vocab_size)


@pytest.fixture(scope="module")
def reversal_run(tmp_path_factory):
    """A small model chat-tuned from scratch to answer a word with its reversal (100 words held out)."""
    from jaxgpt.config import parse_args
    from jaxgpt.trainer import train

    d = tmp_path_factory.mktemp("reversal")
    words = reversal_set(6000)
    held, seen = words[:100], words[100:]
    convs = write_jsonl(d / "c.jsonl", [reversal_conv(w) for w in seen])
    args = train_args(d / "out", d / "data", convs, chat=True, n_head=4, n_embd=64, block_size=64, batch_size=32,
                      max_iters=800, eval_interval=800, log_interval=800, eval_iters=5, warmup_iters=50,
                      lr_decay_iters=800, learning_rate=3e-3, min_lr=3e-4)
    summary = train(parse_args(args), log=lambda s: None)
    return str(d / "out"), held, summary


@pytest.mark.slow  # trains for about a minute on two CPU cores
def test_a_chat_tuned_model_reverses_held_out_words(reversal_run):
    from jaxgpt.loading import load
    from jaxgpt.sampling import ChatSession, Engine

    out, held, summary = reversal_run
    graphdef, params, cfg, _, meta = load(out)
    tmpl = chat.Template.from_meta(meta["tokenizer"])
    engine = Engine(graphdef, params, cfg.block_size, vocab_size=tmpl.vocab_size)
    right = sum(ChatSession(engine, tmpl, cfg.block_size, max_new_tokens=12, top_k=1).reply(w) == w[::-1]
                for w in held)
    print(f"reversal: {right}/{len(held)} exact on held-out words, val loss {summary['val_loss']:.4f}")
    assert right >= 90, f"only {right} of {len(held)} held-out words reversed exactly"


@pytest.mark.slow  # a subprocess
def test_sample_py_chat_answers_one_message_and_chats_until_eof(reversal_run):
    out, held, _ = reversal_run
    r = run_script("sample.py", f"--out_dir={out}", "--chat", f"--start={held[0]}", "--top_k=1")
    assert r.returncode == 0 and r.stdout == held[0][::-1] + "\n", r.stderr
    env_input = "\n".join(held[1:4]) + "\n"
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--chat", "--top_k=1"], cwd=ROOT,
                       input=env_input, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert p.returncode == 0 and "Ctrl-D" in p.stderr, p.stderr
    replies = [line.removeprefix("> ") for line in p.stdout.splitlines() if line.strip() not in ("", ">")]
    # the library's session with sample.py's settings gives the same replies, turn by turn (the history kept)
    from jaxgpt.loading import load
    from jaxgpt.sampling import ChatSession, Engine

    graphdef, params, cfg, _, meta = load(out)
    tmpl = chat.Template.from_meta(meta["tokenizer"])
    session = ChatSession(Engine(graphdef, params, cfg.block_size, vocab_size=tmpl.vocab_size), tmpl, cfg.block_size,
                          max_new_tokens=500, top_k=1, key=jax.random.key(1337))
    assert replies == [session.reply(w) for w in held[1:4]], p.stdout
    assert replies[0] == held[1][::-1]


@pytest.mark.slow  # a live server
def test_chat_completions_use_the_template_with_the_openai_client(reversal_run):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    import socket
    import threading
    import time

    from jaxgpt.loading import load
    from jaxgpt.server import Server
    from jaxgpt.serving import SlotEngine

    out, held, _ = reversal_run
    graphdef, params, cfg, tok, meta = load(out)
    tmpl = chat.Template.from_meta(meta["tokenizer"])
    engine = SlotEngine(graphdef, params, cfg.block_size, slots=4, chunk=4, vocab_size=tmpl.vocab_size)
    server = Server(engine, tok, model_name="rev", log=lambda m: None, template=tmpl)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        w = held[0]
        r = client.chat.completions.create(model="rev", messages=[{"role": "user", "content": w}], top_p=1.0,
                                           extra_body={"top_k": 1}, seed=0)
        assert r.choices[0].message.content == w[::-1] and r.choices[0].finish_reason == "stop"
        assert r.object == "chat.completion" and r.usage.prompt_tokens == len(tmpl.prompt([{"role": "user",
                                                                                              "content": w}]))
        parts = client.chat.completions.create(model="rev", messages=[{"role": "user", "content": w}], stream=True,
                                               extra_body={"top_k": 1}, seed=0)
        chunks = list(parts)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == w[::-1]
        assert chunks[-1].choices[0].finish_reason == "stop"
        # a second turn sees the first through the same template
        history = [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]},
                   {"role": "user", "content": held[1]}]
        r2 = client.chat.completions.create(model="rev", extra_body={"top_k": 1}, messages=history, max_tokens=12)
        from jaxgpt.sampling import Engine

        greedy = Engine(graphdef, params, cfg.block_size, vocab_size=tmpl.vocab_size).generate(
            tmpl.prompt(history), max_new_tokens=12, top_k=1, key=jax.random.key(0), stop=[tmpl.ids["end"]])
        assert r2.choices[0].message.content == tmpl.decode(greedy.tokens[0, :greedy.lengths[0]])
        with pytest.raises(openai.BadRequestError, match="role"):
            client.chat.completions.create(model="rev", messages=[{"role": "robot", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="more than this server's limit"):
            client.chat.completions.create(model="rev", messages=[{"role": "user", "content": "ab" * 100}])
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow  # a LoRA run
def test_a_gpt2_base_grows_its_embedding_for_the_template_and_chats(tmp_path, tiny_gpt2_dir):
    from jaxgpt.config import parse_args
    from jaxgpt.loading import load
    from jaxgpt.sampling import ChatSession, Engine
    from jaxgpt.trainer import train

    convs = write_jsonl(tmp_path / "c.jsonl", [reversal_conv(w) for w in reversal_set(60)])
    lines = []
    train(parse_args(train_args(tmp_path / "out", tmp_path / "data", convs, chat=True, tokenizer="gpt2",
                                init_from=tiny_gpt2_dir, finetune_method="lora", learning_rate=1e-3)),
          log=lines.append)
    meta = json.load(open(tmp_path / "data" / "meta.json"))
    tmpl = chat.Template.from_meta(meta)
    base_vocab = meta["chat"]["base_vocab_size"]
    assert tmpl.ids["bos"] == meta["eot"] and tmpl.ids["end"] == base_vocab + 3
    grown = -(-(base_vocab + 4) // 64) * 64
    assert any(f"grows from {base_vocab} to {grown} rows" in line for line in lines), lines
    graphdef, params, cfg, _, ck = load(str(tmp_path / "out"))
    assert cfg.vocab_size == grown and ck["tokenizer"]["chat"] == meta["chat"]
    session = ChatSession(Engine(graphdef, params, cfg.block_size, vocab_size=tmpl.vocab_size), tmpl, cfg.block_size,
                          max_new_tokens=8, key=jax.random.key(0))
    assert isinstance(session.reply("abc"), str) and len(session.messages) == 2
