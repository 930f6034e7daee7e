"""Conversations: the chat template, reading conversation JSONL, rendering for training and chatting.

    tmpl = Template.new(tokenizer)                # or Template.from_meta(meta) for a trained model
    ids, mask = tmpl.render(messages)             # training: mask = 1 on the assistant's tokens
    prompt = tmpl.prompt(messages)                # chatting: the history, then the assistant's turn start

The template (docs/chat.md): a conversation is

    <|bos|> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

with one special token per role starting its turn and one ending every turn. The loss mask is 1
on the assistant's content and its <|end|> (the model learns to stop), 0 elsewhere (the turn-start
token is given, never predicted). An assistant message with "weight": 0 (OpenAI's fine-tuning
format) is context only: its mask is 0.

GPT-2 BPE: <|bos|> is <|endoftext|> (the document separator the model already knows) and the four
others take the ids after the encoding's last one (50257..50260 for GPT-2), which a model trained
from scratch has in its padded vocabulary (50304 rows); a pretrained GPT-2 (50257 rows) has its
embedding grown (jaxgpt.loading.grow_vocab). Char models get five reserved characters, private-use
code points after every character of the vocabulary, so the vocabulary stays sorted. Content is
encoded as plain text: a message holding the text "<|end|>" cannot end its turn (and reserved
characters in a char model's content are dropped).

The template is stored with the tokenizer's metadata (meta.json's and every checkpoint's
"tokenizer"), under "chat": sampling and serving render exactly what training saw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.tokenizer import CharTokenizer, tokenizer_from_meta

ROLES = ("system", "user", "assistant")
NAMES = {"bos": "<|bos|>", "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
         "end": "<|end|>"}
SPECIALS = ("bos", "system", "user", "assistant", "end")  # the order of their ids
FORMAT = "jaxgpt-chat-1"
CHAR_BASE = 0xE000  # the reserved characters start at the first private-use code point (or after the vocabulary)


@dataclass(frozen=True)
class Template:
    """The chat template of one tokenizer: the id of each special token (SPECIALS)."""
    ids: dict[str, int]
    base_vocab_size: int  # the tokenizer's vocabulary without the template's own tokens
    tokenizer: Any  # the tokenizer content is encoded with (char: with the reserved characters)

    @property
    def vocab_size(self) -> int:
        """Ids the data uses: the base vocabulary and the template's tokens."""
        return max(self.base_vocab_size, max(self.ids.values()) + 1)

    @property
    def eot(self) -> int:
        """<|bos|>: where a model's text ends (jaxgpt.server stops every completion there)."""
        return self.ids["bos"]

    @property
    def kind(self) -> str:
        return self.tokenizer.kind

    @property
    def stop(self) -> list[int]:
        """Tokens that end a reply: <|end|>, and <|bos|> (a model that skips <|end|> starts a new conversation)."""
        return [self.ids["end"], self.ids["bos"]]

    @classmethod
    def new(cls, tok) -> "Template":
        """The template for a tokenizer that has none yet (see the module docstring)."""
        if tok.kind == "char":
            start = max(CHAR_BASE, max((ord(c) for c in tok.chars), default=0) + 1)
            reserved = [chr(start + i) for i in range(len(SPECIALS))]
            chars = list(tok.chars) + reserved
            return cls({s: len(tok.chars) + i for i, s in enumerate(SPECIALS)}, len(tok.chars), CharTokenizer(chars))
        n = tok.vocab_size
        ids = {"bos": tok.eot, **{s: n + i for i, s in enumerate(SPECIALS[1:])}}
        return cls(ids, n, tok)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Template":
        """The template stored in tokenizer metadata (meta.json's, a checkpoint's "tokenizer")."""
        chat = meta.get("chat") if isinstance(meta, dict) else None
        if not isinstance(chat, dict) or chat.get("format") != FORMAT:
            raise UserError("this model was not trained on conversations (its tokenizer has no chat template); "
                            "finetune it on chat data first (python -m jaxgpt.prepare --chat, docs/chat.md)")
        try:
            ids = {s: int(chat["ids"][s]) for s in SPECIALS}
            base = int(chat["base_vocab_size"])
        except (KeyError, TypeError, ValueError):
            raise UserError("the chat template in the model's metadata is damaged; prepare the data again") from None
        return cls(ids, base, tokenizer_from_meta(meta))

    def meta(self) -> dict[str, Any]:
        """The tokenizer's metadata with the template under "chat" (vocab_size: the ids the data uses)."""
        return {**self.tokenizer.meta(), "vocab_size": self.vocab_size,
                "chat": {"format": FORMAT, "ids": dict(self.ids), "names": dict(NAMES),
                         "base_vocab_size": self.base_vocab_size}}

    def encode(self, text: str) -> list[int]:
        """Content as plain tokens (a char model's reserved characters are dropped)."""
        if self.tokenizer.kind == "char":
            reserved = {self.tokenizer.chars[i] for i in self.ids.values()}
            text = "".join(c for c in text if c not in reserved)
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids without the template's tokens."""
        special = set(self.ids.values())
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])

    def render(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation; mask[i] = 1 where ids[i] is trained on."""
        ids, mask = [self.ids["bos"]], [0]
        for m in messages:
            body = self.encode(m["content"]) + [self.ids["end"]]
            learn = int(m["role"] == "assistant" and m.get("weight", 1) != 0)
            ids += [self.ids[m["role"]], *body]
            mask += [0] + [learn] * len(body)
        return ids, mask

    def prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """What the model continues to answer: the conversation so far, then the assistant's turn start."""
        return self.render(messages)[0] + [self.ids["assistant"]]

    def fit(self, messages: list[dict[str, Any]], budget: int) -> tuple[list[int], int]:
        """The prompt of the longest tail of `messages` (whole messages, the system message kept
        while it fits) that fits in `budget` tokens, and how many messages were dropped. A last
        message that alone does not fit is a UserError."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        for head in (system, []):
            for drop in range(len(rest)):
                ids = self.prompt(head + rest[drop:])
                if len(ids) <= budget:
                    return ids, drop + len(system) - len(head)
        raise UserError(f"the message is {len(self.prompt(rest[-1:]))} tokens with the template, more than the "
                        f"{budget} the context leaves; send a shorter one or lower max_new_tokens")


def has_chat(meta: dict[str, Any] | None) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("chat"), dict)


def plain_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer metadata without a chat template: what a base model's tokenizer is compared with."""
    if not has_chat(meta):
        return meta
    out = {k: v for k, v in meta.items() if k != "chat"}
    out["vocab_size"] = meta["chat"]["base_vocab_size"]
    if meta.get("tokenizer") == "char":
        out["chars"] = list(meta["chars"][:out["vocab_size"]])
    return out


def template_for(tok, base_meta: dict[str, Any] | None = None) -> Template:
    """The template to prepare data with: a chat model's own (base_meta with one), else a new one."""
    return Template.from_meta(base_meta) if has_chat(base_meta) else Template.new(tok)


# ----------------------------------------------------------------------------- reading JSONL


def check_conversation(obj: Any) -> str:
    """What is wrong with one parsed JSONL line, or ''."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return 'not an object with a "messages" list'
    msgs = obj["messages"]
    if not msgs:
        return '"messages" is empty'
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}, not one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"message {i} ({m['role']}) has no content (a non-empty string)"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"message {i} has weight {m['weight']!r}, not 0 or 1"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn"
    return ""


@dataclass
class Conversations:
    items: list[list[dict[str, Any]]]  # the conversations, each a list of messages, in order
    bad: list[str]  # "file:line: why" of each bad line left out (skip_bad=True)


def shown(path: str) -> str:
    """A path as messages name it: relative to the working directory when under it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def read_conversations(files: Sequence[str], skip_bad: bool = False) -> Conversations:
    """Every conversation of JSONL `files` (one {"messages": [...]} a line; blank lines are ignored).
    A bad line is a UserError naming file:line, or with skip_bad is left out and listed."""
    out = Conversations([], [])
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                why = check_conversation(json.loads(line))
            except ValueError as e:
                why = f"not JSON ({str(e).split(':')[0]})"
            if why:
                where = f"{shown(path)}:{n}: {why}"
                if not skip_bad:
                    raise UserError(f"{where}; fix the line, or pass --skip_bad_lines=True to leave bad lines out")
                out.bad.append(where)
                continue
            out.items.append([{k: m[k] for k in ("role", "content", "weight") if k in m}
                              for m in json.loads(line)["messages"]])
    return out


def encode_conversations(convs: Sequence[list[dict[str, Any]]], tmpl: Template, dtype) -> tuple[np.ndarray, np.ndarray]:
    """All conversations rendered back to back: (tokens, mask uint8)."""
    ids, mask = [], []
    for c in convs:
        i, m = tmpl.render(c)
        ids += i
        mask += m
    return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8)


# ----------------------------------------------------------------------------- windows for training


def windows(tokens: np.ndarray, tmpl_meta: dict[str, Any], block_size: int) -> tuple[np.ndarray, int]:
    """Start offsets of the training windows of a chat split (block_size + 1 tokens each) and how
    many conversations were longer than a window. Each conversation starts a window at its <|bos|>;
    one that does not fit is split: another window starts at each of its later user turns that a
    window from the last start cannot reach (so no assistant turn is left out unless one turn alone
    is longer than a window, whose tail is then cut). Windows may run into the next conversation."""
    ids = tmpl_meta["chat"]["ids"]
    bos = np.flatnonzero(tokens == ids["bos"])
    users = np.flatnonzero(tokens == ids["user"])
    bounds = np.append(bos, len(tokens))
    starts, long = [], 0
    for b, e in zip(bounds[:-1], bounds[1:]):
        starts.append(b)
        if e - b <= block_size + 1:
            continue
        long += 1
        turns = users[(users > b) & (users < e)]
        last = b
        for k, u in enumerate(turns):
            nxt = turns[k + 1] if k + 1 < len(turns) else e
            if nxt - last > block_size + 1 and u > last:
                starts.append(u)
                last = u
    return np.asarray(starts, dtype=np.int64), long
