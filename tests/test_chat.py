"""Chat: the template and its loss mask, conversation JSONL (bad lines named file:line), prepare --chat,
batches that carry the mask, the masked loss against NumPy (masked tokens get no gradient), windows
over long conversations, the embedding grown for the template's tokens, finetuning from a modern run,
a capability test (reversal learned to >= 90% exact on held-out words), sample.py --chat."""

import json
import os
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


def test_grown_vocab_keeps_the_old_rows_and_is_the_same_every_time():
    params = {"wte": {"embedding": np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)},
              "lm_head": {"kernel": np.ones((4, 10), np.float32)}}
    a, b = grow_vocab(params, 16), grow_vocab(params, 16)
    assert a["wte"]["embedding"].shape == (16, 4) and a["lm_head"]["kernel"].shape == (4, 16)
    np.testing.assert_array_equal(a["wte"]["embedding"][:10], params["wte"]["embedding"])
    np.testing.assert_array_equal(a["wte"]["embedding"], b["wte"]["embedding"])
    assert len({tuple(r) for r in a["wte"]["embedding"][10:]}) == 6  # distinct rows
    assert grow_vocab(params, 8) is params
