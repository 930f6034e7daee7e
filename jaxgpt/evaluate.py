"""Evaluating a model: multiple-choice benchmarks scored completion-style, and bits per byte over text.

    questions = read_choices("hellaswag_val.jsonl", "hellaswag")        # checked before a model loads
    scorer = Scorer(graphdef, params, model_cfg.block_size, tok.vocab_size)
    result = score_choices(scorer, questions, tok)                       # result.metrics["acc_norm"], ...
    result = bits_per_byte(scorer, read_texts("input.txt"), tok)        # result.bpb, result.perplexity

Multiple choice, as llm.c scores HellaSwag. An example is a context and its endings (HellaSwag's
jsonl: ctx, endings, label; a generic jsonl: question, choices, answer). Each ending is scored as
a completion: the context and " " + ending are tokenized separately and concatenated, and the
ending's tokens' log-likelihood given the context is summed. `acc` picks the ending with the
largest sum, `acc_norm` the one with the largest mean per token (llm.c's acc_norm). Also kept: the
sum divided by the ending's characters and by its UTF-8 bytes, lm-evaluation-harness's `acc_norm`
and `acc_bytes`, so its numbers can be checked against these (docs/evaluate.md). Where the two
disagree by design: the harness tokenizes context + ending whole and splits it, llm.c (and this
module) each part on its own; GPT-2's BPE splits at the space before a word, so they rarely differ.
A context and ending longer than the context window keep their last block_size + 1 tokens (the
context is cut from the left, as the harness does); a BPE model reads an empty context as its
<|endoftext|> token (the harness's rule).

Bits per byte. Each document (a file, or each file of a directory) is tokenized with the model's
own tokenizer and scored in windows of block_size tokens that advance by `stride`: every token is
scored once, by the window whose new tokens it is among, so each has at least block_size - stride
tokens of context (all of them while the document is shorter than the window). A BPE model scores
every token after its <|endoftext|> token (the harness's rule for rolling log-likelihoods); a
character model every token but the first. bits per byte = the summed negative log-likelihood in
nats / ln 2 / the scored text's UTF-8 bytes; perplexity = exp(mean negative log-likelihood per token).

What compiles. Rows (a context with one ending, or one window) are grouped by length into
power-of-two buckets (serving.bucket) and batched to about `batch_tokens` tokens, so a whole file
compiles one program per bucket, a handful, never one per example. log-softmax and log-likelihoods
are float32 (jaxgpt.head.target_logprobs).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxgpt.errors import UserError
from jaxgpt.serving import bucket
from jaxgpt.tokenizer import decode_text

# task -> (context field, endings field, label field)
FORMATS = {"hellaswag": ("ctx", "endings", "label"), "mc": ("question", "choices", "answer")}
MIN_BUCKET = 16
MAX_LINE_BYTES = 16 << 20


@dataclass(frozen=True)
class Question:
    """One multiple-choice example as read: `where` is file:line, for messages."""
    context: str
    endings: tuple[str, ...]
    label: int
    where: str


def _label(value, n: int, name: str, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # Hugging Face's copy of HellaSwag has "0".."3"
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: {name} must be the index of the right ending (an integer), got {json.dumps(value)}")
    if not 0 <= value < n:
        raise UserError(f"{where}: {name} {value} is out of range: this example has {n} endings, so 0 to {n - 1}")
    return value


def parse_question(line: str, task: str, where: str) -> Question:
    """One jsonl line of `task`'s format as a Question; bad data is one UserError naming `where`."""
    ctx_key, end_key, label_key = FORMATS[task]
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: a line must be a JSON object with {ctx_key}, {end_key} and {label_key}")
    missing = [k for k in (ctx_key, end_key, label_key) if k not in d]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r} ({task} lines have {ctx_key}, {end_key}, {label_key})")
    ctx, endings = d[ctx_key], d[end_key]
    if not isinstance(ctx, str):
        raise UserError(f"{where}: {ctx_key} must be a string, got {json.dumps(ctx)[:60]}")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: {end_key} must be a list of at least two strings")
    for i, e in enumerate(endings):
        if not e.strip():
            raise UserError(f"{where}: {end_key}[{i}] is empty: it tokenizes to nothing but the space before it")
    return Question(ctx, tuple(endings), _label(d[label_key], len(endings), label_key, where), where)


def read_choices(path: str, task: str, limit: int = 0) -> list[Question]:
    """The first `limit` (0 = all) examples of a jsonl file in `task`'s format (FORMATS); blank
    lines are skipped. Checked whole here, before any model is loaded."""
    if os.path.isdir(path):
        raise UserError(f"data {path} is a directory; --task={task} reads one jsonl file")
    out = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                if len(raw) > MAX_LINE_BYTES:
                    raise UserError(f"{where}: a line of over {MAX_LINE_BYTES >> 20} MiB; one example per line")
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{where}: not UTF-8 text") from None
                if line.strip():
                    out.append(parse_question(line, task, where))
                    if len(out) == limit:
                        break
    except OSError as e:
        raise UserError(f"cannot read data {path}: {e.strerror}") from None
    if not out:
        raise UserError(f"data {path} holds no examples (one JSON object per line)")
    return out


# ---------------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Row:
    """tokens (at most block_size + 1): the model reads tokens[:-1] and the last `scored` of
    tokens[1:] are scored."""
    tokens: tuple[int, ...]
    scored: int


class Scorer:
    """Log-likelihoods of rows, batched and compiled once per (rows, length) bucket."""

    def __init__(self, graphdef, params, block_size: int, vocab_size: int, batch_tokens: int = 8192):
        self.graphdef, self.params, self.S, self.V = graphdef, params, block_size, vocab_size
        self.batch_tokens = batch_tokens
        self._compiled: dict = {}
        self.compile_seconds = 0.0

    def _program(self, R: int, L: int):
        if (R, L) not in self._compiled:
            graphdef, V = self.graphdef, self.V

            def run(params, idx, targets):  # idx, targets (R, L) -> log p(targets) (R, L) float32
                return nnx.merge(graphdef, params).token_logprobs(idx, targets, vocab=V)

            t0 = time.perf_counter()
            spec = jax.ShapeDtypeStruct((R, L), jnp.int32)
            self._compiled[(R, L)] = jax.jit(run).lower(self.params, spec, spec).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[(R, L)]

    @property
    def programs(self) -> int:
        return len(self._compiled)

    def length(self, n: int) -> int:
        """The padded length (bucket) of a row whose model input is n tokens."""
        return bucket(max(n, min(MIN_BUCKET, self.S)), self.S)

    def loglikelihoods(self, rows: list[Row], desc: str = "scoring", unit: str = "row") -> list[np.ndarray]:
        """Per row, the float32 log-likelihoods of its scored tokens, in order."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            n = len(r.tokens) - 1
            if not 1 <= r.scored <= n <= self.S:
                raise ValueError(f"row {i}: {n} input tokens, {r.scored} scored, block_size {self.S}")
            groups.setdefault(self.length(n), []).append(i)
        out: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc=desc, unit=unit, dynamic_ncols=True, disable=None, file=sys.stderr)
        for L in sorted(groups):
            members = groups[L]
            R = min(max(1, self.batch_tokens // L), bucket(len(members), 1 << 30))
            for b in range(0, len(members), R):
                batch = members[b:b + R]
                idx = np.zeros((R, L), np.int32)  # right-padded with token 0: causal, so it changes nothing before it
                tgt = np.zeros((R, L), np.int32)
                for j, i in enumerate(batch):
                    t = rows[i].tokens
                    idx[j, :len(t) - 1], tgt[j, :len(t) - 1] = t[:-1], t[1:]
                lp = np.asarray(self._program(R, L)(self.params, idx, tgt))  # (R, L)
                for j, i in enumerate(batch):
                    n = len(rows[i].tokens) - 1
                    out[i] = lp[j, n - rows[i].scored:n]
                bar.update(len(batch))
        bar.close()
        return out


def _encode(tok, text: str, where: str) -> list[int]:
    try:
        return tok.encode(text)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def choice_rows(questions: list[Question], tok, block_size: int) -> tuple[list[Row], int]:
    """One Row per ending (context tokens + " " + ending's tokens, the ending's scored), and how
    many rows had their context cut from the left to fit block_size."""
    rows, cut = [], 0
    eot = getattr(tok, "eot", None)
    for q in questions:
        ctx = _encode(tok, q.context, q.where)
        if not ctx:
            if eot is None:
                raise UserError(f"{q.where}: the context is empty, and this model's tokenizer has no "
                                f"<|endoftext|> token to stand for it; give every example a context")
            ctx = [eot]
        for i, ending in enumerate(q.endings):
            end = _encode(tok, " " + ending, q.where)
            if not end:
                raise UserError(f"{q.where}: ending {i} tokenizes to nothing")
            if len(end) > block_size:
                raise UserError(f"{q.where}: ending {i} is {len(end)} tokens, longer than the model's context "
                                f"of {block_size}; it cannot be scored")
            whole = ctx + end
            cut += len(whole) > block_size + 1
            rows.append(Row(tuple(whole[-(block_size + 1):]), len(end)))
    return rows, cut


def choice_metrics(lls: list[np.ndarray], questions: list[Question]) -> dict[str, float]:
    """acc (by the summed log-likelihood), acc_norm (by the mean per token: llm.c's), acc_chars and
    acc_bytes (the sum per character and per UTF-8 byte of the ending: the harness's acc_norm and
    acc_bytes). lls: per ending, in order, its tokens' log-likelihoods. Ties go to the first."""
    hits = {"acc": 0, "acc_norm": 0, "acc_chars": 0, "acc_bytes": 0}
    k = 0
    for q in questions:
        ends = lls[k:k + len(q.endings)]
        k += len(q.endings)
        total = np.array([float(np.sum(e, dtype=np.float64)) for e in ends])
        per = {"acc": total, "acc_norm": total / np.array([len(e) for e in ends]),
               "acc_chars": total / np.array([len(e) for e in q.endings]),
               "acc_bytes": total / np.array([len(e.encode("utf-8")) for e in q.endings])}
        for name, v in per.items():
            hits[name] += int(np.argmax(v) == q.label)
    return {name: h / len(questions) for name, h in hits.items()}


@dataclass
class ChoiceResult:
    metrics: dict[str, float]
    loglikelihoods: list[float]  # per ending, in file order: the summed log-likelihood
    examples: int
    seconds: float  # scoring, compilation excluded
    compile_seconds: float
    programs: int
    cut: int  # rows whose context was cut from the left

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("inf")


def score_choices(scorer: Scorer, questions: list[Question], tok) -> ChoiceResult:
    rows, cut = choice_rows(questions, tok, scorer.S)
    c0, t0 = scorer.compile_seconds, time.perf_counter()
    lls = scorer.loglikelihoods(rows, desc="examples x endings", unit="ending")
    compile_s = scorer.compile_seconds - c0
    seconds = time.perf_counter() - t0 - compile_s
    return ChoiceResult(choice_metrics(lls, questions), [float(np.sum(x, dtype=np.float64)) for x in lls],
                        len(questions), seconds, compile_s, scorer.programs, cut)


# ---------------------------------------------------------------------------------------- bits per byte

def read_texts(path: str) -> list[tuple[str, str]]:
    """(name, text) of a text file, or of every file under a directory (sorted, dot-files skipped);
    UTF-8, or UTF-16/32 with a byte-order mark (jaxgpt.tokenizer.decode_text), newlines read as
    training reads a corpus (\r\n and \r as \n)."""
    if os.path.isdir(path):
        files = []
        for d, subdirs, names in os.walk(path):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            files += [os.path.join(d, f) for f in names if not f.startswith(".")]
        files.sort()
        if not files:
            raise UserError(f"data {path} is a directory with no files to score")
    else:
        files = [path]
    out = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise UserError(f"cannot read data {f}: {e.strerror}") from None
        # newlines as training reads them (Python's universal newlines: \r\n and \r become \n)
        out.append((f, decode_text(data, f).replace("\r\n", "\n").replace("\r", "\n")))
    return out


def windows(n: int, T: int, stride: int) -> list[tuple[int, int, int]]:
    """(lo, s, e) for a sequence of n tokens: the row seq[lo:e] (at most T + 1 tokens) scores the
    targets s..e-1. The first window scores 1..min(n, T + 1) - 1, each later one the next `stride`."""
    out, s, e = [], 1, min(n, T + 1)
    while s < n:
        out.append((max(0, e - 1 - T), s, e))
        s, e = e, min(n, e + stride)
    return out


@dataclass
class BitsResult:
    nll: float  # nats, summed over the scored tokens
    tokens: int
    bytes: int
    documents: int
    seconds: float
    compile_seconds: float
    programs: int

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def bits_per_byte(scorer: Scorer, texts: list[tuple[str, str]], tok, stride: int = 0) -> BitsResult:
    """Bits per byte and perplexity of the texts, each scored on its own (see the module docstring).
    stride: tokens each window advances (0 = block_size // 2)."""
    T = scorer.S
    stride = stride or max(1, T // 2)
    if not 1 <= stride <= T:
        raise UserError(f"stride must be in [1, block_size={T}], got {stride}")
    eot = getattr(tok, "eot", None)
    rows, n_bytes, docs = [], 0, 0
    for name, text in texts:
        ids = _encode(tok, text, name)
        if eot is not None:
            seq, scored_text = [eot] + ids, text
        else:
            seq, scored_text = ids, text[len(tok.decode(ids[:1])):]
        if len(seq) < 2:
            continue  # nothing to score (an empty file; one character)
        docs += 1
        n_bytes += len(scored_text.encode("utf-8"))
        rows += [Row(tuple(seq[lo:e]), e - s) for lo, s, e in windows(len(seq), T, stride)]
    if not rows or n_bytes == 0:
        raise UserError(f"nothing to score in {', '.join(n for n, _ in texts[:3])}: the text is empty "
                        f"(or one character)")
    c0, t0 = scorer.compile_seconds, time.perf_counter()
    lls = scorer.loglikelihoods(rows, desc="windows", unit="window")
    compile_s = scorer.compile_seconds - c0
    seconds = time.perf_counter() - t0 - compile_s
    nll = -sum(float(np.sum(x, dtype=np.float64)) for x in lls)
    return BitsResult(nll, sum(r.scored for r in rows), n_bytes, docs, seconds, compile_s, scorer.programs)
