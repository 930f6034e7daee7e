"""Corpus preparation: a text file or a directory of them into train.bin / val.bin / meta.json.

    python -m jaxgpt.prepare --input input.txt --data_dir data/shakespeare_char
    python -m jaxgpt.prepare --input ~/src/project --include '**/*.py' --exclude 'build/**' \\
        --tokenizer gpt2 --data_dir data/project_gpt2

A corpus is a text file or a directory of them, each file one document. The char tokenizer
holds the corpus in memory (small corpora); GPT-2's BPE streams it in chunks through a pool of
processes, so a corpus larger than RAM prepares in bounded memory. The token files are flat
arrays (uint16, or uint32 for vocabularies over 65536), which jaxgpt.data reads.
"""

from __future__ import annotations

import codecs
import collections
import json
import multiprocessing
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jaxgpt import chat as chat_lib
from jaxgpt import tokenizer as tok_lib
from jaxgpt.data import SPLITS, load_meta
from jaxgpt.cli import run_cli
from jaxgpt.config import ANY, choice, group, nonempty, parse_args, rng, validate_fields
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOADS = {"shakespeare_char": SHAKESPEARE_URL, "shakespeare": SHAKESPEARE_URL}
# meta.json keys that describe the corpus; the rest is the tokenizer's meta.
CORPUS_KEYS = ("dtype", "source", "train_tokens", "val_tokens", "documents", "skipped_files")
# and those prepare_chat adds (the template itself, "chat", is the tokenizer's)
CHAT_CORPUS_KEYS = ("conversations", "skipped_lines", "train_assistant_tokens", "val_assistant_tokens")
# Always left out of a directory corpus: hidden files and directories (.git, .venv, ...), caches.
DEFAULT_EXCLUDE = ("**/.*", "**/__pycache__")

CHUNK_BYTES = 1 << 20  # target size of one BPE task; smaller for small corpora, see _chunk_target
MIN_CHUNK_BYTES = 1 << 14
READ_BYTES = 1 << 20  # file read size
SNIFF_BYTES = 1 << 16  # a directory's file with a NUL or invalid UTF-8 in its first 64 KiB is binary
BYTES_PER_WORKER = 16 << 20  # workers=0 starts one worker process per this much corpus, up to the CPU count


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}; pass an existing text file with --input_file=PATH")
    check_not_utf16(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first") from None
    if not text:
        raise UserError(f"{path} is empty; give a text corpus to train on")
    return text


def check_not_utf16(path: str) -> None:
    """A corpus is UTF-8 (a UTF-8 byte-order mark is kept as a character): a UTF-16 or UTF-32 file,
    recognised by its byte-order mark, is one line saying how to convert it."""
    with open(path, "rb") as f:
        enc = tok_lib.bom_encoding(f.read(4))
    if enc in ("utf-16", "utf-32"):
        raise UserError(f"{path} is {enc.upper()} text (it starts with a {enc.upper()} byte-order mark); convert it "
                        f"to UTF-8 first, e.g. iconv -f {enc.upper()} -t UTF-8 {path} > {os.path.basename(path)}.utf8")


def encode_chars(text: str, tok: CharTokenizer) -> np.ndarray:
    """Vectorised char encoding: the vocabulary is sorted by code point, so ids = ranks."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.array([ord(c) for c in tok.chars], dtype=np.uint32)
    ids = np.searchsorted(vocab, codes)
    if not np.array_equal(vocab[np.minimum(ids, len(vocab) - 1)], codes):
        tok.encode(text)  # raises the error naming the unknown characters
    return ids.astype(token_dtype(tok.vocab_size))


# ---------------------------------------------------------------------------------------------
# Which files make the corpus


def glob_regex(pattern: str) -> re.Pattern:
    """A glob over POSIX relative paths: `**` spans directories (`**/*.py` matches a.py and x/y/a.py),
    `*`, `?` and `[...]` stay within one path component."""
    p, out, i = pattern.strip().removeprefix("./").strip("/"), [], 0
    while i < len(p):
        if p.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif p.startswith("/**", i) and i + 3 == len(p):
            out.append("(?:/.*)?")
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif p[i] == "*":
            out.append("[^/]*")
            i += 1
        elif p[i] == "?":
            out.append("[^/]")
            i += 1
        elif p[i] == "[" and "]" in p[i + 2:]:
            j = p.index("]", i + 2)
            body = p[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(p[i]))
            i += 1
    try:
        return re.compile("(?s:" + "".join(out) + r")\Z")
    except re.error as e:
        raise UserError(f"the glob {pattern!r} is malformed ({e.msg}); fix the --include / --exclude pattern") from None


def _matches(rel: str, patterns: Sequence[re.Pattern]) -> bool:
    """Whether a pattern matches `rel` or one of its directories (`build` and `build/**` both take
    everything under build/)."""
    parts = rel.split("/")
    return any(p.match("/".join(parts[:k])) for k in range(1, len(parts) + 1) for p in patterns)


def list_files(root: str, include: Sequence[str] = (), exclude: Sequence[str] = (),
               skip_dirs: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under `root` that match an `include` glob (default: all)
    and no `exclude` glob nor DEFAULT_EXCLUDE, in sorted order. `skip_dirs` (absolute) are pruned."""
    inc = [glob_regex(p) for p in include or ("**",)]
    exc = [glob_regex(p) for p in (*DEFAULT_EXCLUDE, *exclude)]
    skip = {os.path.realpath(d) for d in skip_dirs}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not _matches(rel_dir + d, exc)
                       and os.path.realpath(os.path.join(dirpath, d)) not in skip]
        found += [rel_dir + f for f in filenames if _matches(rel_dir + f, inc) and not _matches(rel_dir + f, exc)
                  and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(found)


def looks_binary(path: str) -> bool:
    """NUL bytes or invalid UTF-8 at the start of the file (a sequence cut by the sniff is fine)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return True
    return b"\0" in head


@dataclass
class Corpus:
    source: str  # absolute path of the input file or directory
    files: list[str]  # absolute paths of the documents, in order
    size: int  # their bytes
    skipped: int  # binary files left out of a directory
    is_dir: bool


def find_corpus(input_path: str, include: Sequence[str] = (), exclude: Sequence[str] = (),
                data_dir: str = "") -> Corpus:
    """The documents of `input_path`: the file itself, or the selected text files of a directory.
    Empty files are left out; binary ones (see looks_binary) are left out and counted."""
    source = os.path.abspath(input_path)
    if os.path.isfile(input_path):
        size = os.path.getsize(input_path)
        if size == 0:
            raise UserError(f"{input_path} is empty; give a text corpus to train on")
        check_not_utf16(input_path)
        return Corpus(source, [source], size, 0, False)
    if not os.path.isdir(input_path):
        raise UserError(f"input file not found: {input_path}; pass an existing text file or directory "
                        f"with --input_file=PATH")
    rel = list_files(input_path, include, exclude, skip_dirs=[data_dir] if data_dir else [])
    patterns = f"include {' '.join(include) or '(all)'} and exclude {' '.join((*DEFAULT_EXCLUDE, *exclude))}"
    if not rel:
        raise UserError(f"no file in {input_path} matches {patterns}; fix the patterns or the directory")
    files, size, skipped = [], 0, 0
    for r in rel:
        path = os.path.join(source, *r.split("/"))
        n = os.path.getsize(path)
        if n and looks_binary(path):
            skipped += 1
        elif n:
            files.append(path)
            size += n
    if not files:
        raise UserError(f"the {len(rel)} file(s) in {input_path} matching {patterns} are all binary or empty; "
                        f"point --include at text files")
    return Corpus(source, files, size, skipped, True)


# ---------------------------------------------------------------------------------------------
# Cutting large files without changing their BPE tokens
#
# GPT-2's pre-tokenizer (tokenizer.GPT2_PATTERN) splits text into pieces that BPE encodes one by
# one, so a cut between two pieces changes no token, provided both sides split as the whole did.
# Whitespace only ever joins what follows through the optional single space that leads a word,
# so a whitespace run W followed by a non-space character splits as W[:-1] | W[-1] + word...
# (`\s+(?!\S)` backs off one character). Cutting right before W[-1] is therefore safe: the left
# side ends in W[:-1], which alone at the end of text is again one piece (`\s++$`); the right
# side starts a piece at W[-1] exactly where the whole text did, and the pattern never looks
# behind. The whitespace character at the cut is one of Unicode's White_Space (the pattern's \s),
# found as UTF-8 bytes, so cuts fall between characters; the next character must not be
# whitespace in any sense (str.isspace covers White_Space).

_WHITESPACE = (rb"[ \t\n\r\x0b\x0c]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]"
               rb"|\xe2\x81\x9f|\xe3\x80\x80")
_CUT = re.compile(rb"(?:" + _WHITESPACE + rb")(?![ \t\n\r\x0b\x0c])")


def _non_space_at(buf: bytes, j: int) -> bool:
    """Whether a whole character starts at buf[j] and is not whitespace."""
    if j >= len(buf):
        return False
    b = buf[j]
    if b < 0x80:
        return True  # _CUT already ruled out ASCII whitespace
    n = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
    try:
        return j + n <= len(buf) and not buf[j:j + n].decode("utf-8").isspace()
    except UnicodeDecodeError:
        return False


def safe_cut(buf: bytes, lo: int, hi: int) -> int:
    """The last c in (lo, hi] where buf[:c] and buf[c:] tokenize as the whole does, else -1."""
    end, window = min(hi, len(buf) - 2), 256  # text has a cut every few bytes: look back a little first
    while end > lo:
        start = max(lo + 1, end - window + 1)
        hits = [m for m in _CUT.finditer(buf, start, end + 8) if m.start() <= end]
        for m in reversed(hits):
            if _non_space_at(buf, m.end()):
                return m.start()
        end, window = start - 1, min(2 * window, 1 << 16)
    return -1


def next_cut(buf: bytes, lo: int) -> int:
    """The first c > lo where buf may be cut (as safe_cut), else -1."""
    for m in _CUT.finditer(buf, lo + 1):
        if _non_space_at(buf, m.end()):
            return m.start()
    return -1


class _PieceReader:
    """Reads a file in pieces of at most `want` bytes that end at safe cuts (longer only where
    no safe cut comes sooner). Holds about one read block besides the piece."""

    def __init__(self, f):
        self.f, self.buf, self.start, self.eof, self.offset = f, b"", 0, False, 0

    def _fill(self, need: int) -> None:
        if len(self.buf) - self.start >= need or self.eof:
            return
        blocks, have = [self.buf[self.start:]], len(self.buf) - self.start
        while have < need:
            block = self.f.read(max(READ_BYTES, need - have))
            if not block:
                self.eof = True
                break
            blocks.append(block)
            have += len(block)
        self.buf, self.start = b"".join(blocks), 0

    @property
    def done(self) -> bool:
        return self.eof and self.start == len(self.buf)

    def read(self, want: int) -> bytes:
        self._fill(want + 8)  # + the characters around a cut
        size = len(self.buf) - self.start
        if self.eof and size <= want:
            cut = size
        else:
            cut, scanned = safe_cut(self.buf, self.start, self.start + want) - self.start, want
            while cut < 0:
                cut = next_cut(self.buf, self.start + scanned) - self.start
                if cut < 0 and self.eof:
                    cut = size
                elif cut < 0:  # no safe cut yet: read on, growing geometrically (the piece outgrows `want`)
                    scanned = max(scanned, size - 8)
                    self._fill(max(size + READ_BYTES, 2 * size))
                    size = len(self.buf) - self.start
        piece = self.buf[self.start:self.start + cut]
        self.start += cut
        self.offset += cut
        self._fill(1)  # so that `done` tells whether this was the file's last piece
        return piece


@dataclass
class _Task:
    start: int  # corpus byte offset of its first piece
    pieces: list[tuple[bytes, bool]]  # (UTF-8 bytes, ends a document)
    origins: list[tuple[str, int]]  # (file, byte offset in it) of each piece, for error messages


def _tasks(files: Sequence[str], target: int, split_at: int) -> Iterator[_Task]:
    """The corpus in order as tasks of about `target` bytes; a task never crosses corpus byte
    `split_at` (up to the nearest safe cut), so train and val are whole tasks."""
    offset, task = 0, _Task(0, [], [])
    for path in files:
        with open(path, "rb") as f:
            reader = _PieceReader(f)
            while not reader.done:
                want = target - (offset - task.start)
                if offset < split_at:
                    want = min(want, split_at - offset)
                at = reader.offset
                piece = reader.read(max(want, 1))
                if not piece:
                    break  # the file shrank since it was listed
                task.pieces.append((piece, reader.done))
                task.origins.append((path, at))
                offset += len(piece)
                # full: a piece cut short of its file's end, the target reached, or the split reached
                if not reader.done or offset - task.start >= target or task.start < split_at <= offset:
                    yield task
                    task = _Task(offset, [], [])
    if task.pieces:
        yield task


def _chunk_target(total: int) -> int:
    return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, total // 200))


def _pool_context():
    """fork on Linux while JAX has not started its runtime: workers start at once and share the
    parent's memory. Once JAX runs its threads, forking can deadlock (JAX warns), so forkserver:
    workers start from a clean process, but each imports the __main__ module again (a script
    calling prepare with workers > 1 then needs the `if __name__ == "__main__":` guard)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")  # JAX's own test for its at-fork warning
    jax_running = xla_bridge is not None and getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if sys.platform.startswith("linux") and not jax_running:
        return multiprocessing.get_context("fork")
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _encode_bpe(corpus: Corpus, tok: tok_lib.BPETokenizer, dtype: np.dtype, outs: dict, split_at: int,
                workers: int, verbose: bool) -> dict[str, int]:
    """Streams the corpus through `workers` processes in order, appending tokens to outs[split]."""
    counts = dict.fromkeys(SPLITS, 0)
    tasks = _tasks(corpus.files, _chunk_target(corpus.size), split_at)
    pending: collections.deque = collections.deque()

    def write_oldest():
        task, result = pending.popleft()
        out = result.get() if pool else result
        if isinstance(out, tuple):
            path, at = task.origins[out[0]]
            raise UserError(f"{path} is not UTF-8 text (bad byte at offset {at + out[1]}); "
                            f"convert it to UTF-8 first or leave it out with --exclude")
        split = "train" if task.start < split_at else "val"
        outs[split].write(out)
        counts[split] += len(out)
        bar.update(sum(len(p) for p, _ in task.pieces))

    pool = _pool_context().Pool(workers, tok_lib.init_worker, (tok,)) if workers > 1 else None
    bar = tqdm(total=corpus.size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               disable=not verbose, desc="tokenizing", smoothing=0.1)  # after the fork: tqdm may start a thread
    try:
        for task in tasks:
            if pool:  # at most 2 tasks per worker in flight: bounded memory, workers never idle
                pending.append((task, pool.apply_async(tok_lib.encode_pieces, (task.pieces, dtype.str))))
            else:
                pending.append((task, tok_lib.encode_pieces(task.pieces, dtype.str, tok)))
            while len(pending) > 2 * workers:
                write_oldest()
        while pending:
            write_oldest()
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
    return counts


def _read_char_corpus(corpus: Corpus) -> tuple[str, int, int]:
    """(all documents joined by "\\n", documents, skipped files). The char vocabulary has no
    end-of-text token; a newline is what separates files in a text anyway."""
    texts, skipped = [], corpus.skipped
    for path in corpus.files:
        if not corpus.is_dir:
            texts.append(read_text(path))
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError:  # binary past the sniffed start
            skipped += 1
    if not texts:
        raise UserError(f"{corpus.source} holds no UTF-8 text; point --input_file at text files")
    return "\n".join(texts), len(texts), skipped


def _drop_unknown_chars(text: str, tok: CharTokenizer, verbose: bool) -> str:
    """Finetuning a char model on new text: characters the base never saw have no embedding, so
    they are dropped, and the count is printed (rather than refusing a corpus with one stray 'é')."""
    unknown = sorted(set(text) - set(tok.chars))
    if not unknown:
        return text
    kept = text.translate({ord(c): None for c in unknown})
    if verbose:
        shown = "".join(unknown[:30]) + (" ..." if len(unknown) > 30 else "")
        print(f"note: dropped {len(text) - len(kept):,} characters ({len(unknown)} distinct: {shown!r}) that the "
              f"base model's vocabulary lacks")
    return kept


def _discard(paths: dict[str, str]) -> None:
    for p in paths.values():
        if os.path.exists(p + ".part"):
            os.remove(p + ".part")


def check_options(tokenizer: str, tokenizer_meta: dict[str, Any] | None, val_fraction: float, data_dir: str) -> None:
    """What text and chat preparation both check before reading anything: one UserError each."""
    if tokenizer not in tok_lib.KINDS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(tok_lib.KINDS)}")
    if tokenizer_meta and tokenizer_meta.get("tokenizer") != tokenizer:
        raise UserError(f"the base model's tokenizer is {tokenizer_meta.get('tokenizer')!r}; "
                        f"pass --tokenizer={tokenizer_meta.get('tokenizer')}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is a file, not a directory; pass a directory for the prepared data")


def prepare(input_path: str, data_dir: str, tokenizer: str = "char", tokenizer_dir: str = "",
            include: Sequence[str] = (), exclude: Sequence[str] = (), val_fraction: float = 0.1,
            workers: int = 0, verbose: bool = True, tokenizer_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenizes a text file or a directory into data_dir's train.bin, val.bin and meta.json.

    Directory: its files in sorted order of their relative paths, each one document, selected by
    `include` globs (default: all) minus `exclude` globs, which add to the ones always applied:
    hidden files and directories and __pycache__ (DEFAULT_EXCLUDE). Globs match the path relative
    to the directory with / separators, or any of its parent directories. Binary files are skipped
    and counted; data_dir, if inside, is never read. include/exclude do not apply to a file input.

    tokenizer 'gpt2': BPE from `tokenizer_dir` (Hugging Face vocab.json + merges.txt) or tiktoken;
    every document is followed by the end-of-text token; the corpus streams through `workers`
    processes (0: one per 16 MiB of corpus, up to the CPUs available; see _pool_context). train
    is the first 1 - val_fraction of the corpus bytes, val the rest (cut at a safe point).
    tokenizer 'char': vocabulary = the corpus's characters; documents are joined by "\\n"; train
    is the first 1 - val_fraction of the tokens. The whole corpus is held in memory.
    `tokenizer_meta` encodes with a given tokenizer instead (a base model's, for fine-tuning); with a
    char vocabulary, characters outside it are dropped and counted.
    """
    check_options(tokenizer, tokenizer_meta, val_fraction, data_dir)
    if workers < 0:
        raise UserError(f"workers must be >= 0 (0: automatic), not {workers}")
    t0 = time.perf_counter()
    corpus = find_corpus(input_path, include, exclude, data_dir)
    tok = tok_lib.tokenizer_from_meta(tokenizer_meta) if tokenizer_meta else None
    if tokenizer == "gpt2":  # before touching data_dir: the BPE files may be out of reach
        tok = tok or tok_lib.load_bpe(tokenizer_dir)
        if tok.encoding._pat_str != tok_lib.GPT2_PATTERN:
            raise UserError(f"the BPE encoding {tok.encoding.name!r} does not split text as GPT-2 does; "
                            f"preparing data needs GPT-2's pre-tokenizer")
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        os.remove(os.path.join(data_dir, "meta.json"))  # data_dir counts as prepared once all is written
    paths = {s: os.path.join(data_dir, f"{s}.bin") for s in SPLITS}
    try:
        if tokenizer == "char":
            text, documents, skipped = _read_char_corpus(corpus)
            if tok is not None:
                text = _drop_unknown_chars(text, tok, verbose)
            tok = tok or CharTokenizer.from_text(text)
            ids = encode_chars(text, tok)
            n = int((1 - val_fraction) * len(ids))
            for split, part in (("train", ids[:n]), ("val", ids[n:])):
                part.tofile(paths[split] + ".part")
            counts = {"train": n, "val": len(ids) - n}
        else:
            documents, skipped = len(corpus.files), corpus.skipped
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = workers or min(cpus, 1 + corpus.size // BYTES_PER_WORKER)
            with open(paths["train"] + ".part", "wb") as tr, open(paths["val"] + ".part", "wb") as va:
                counts = _encode_bpe(corpus, tok, token_dtype(tok.vocab_size), {"train": tr, "val": va},
                                     round((1 - val_fraction) * corpus.size), workers, verbose)
        if not (counts["train"] and counts["val"]):
            raise UserError(f"{input_path} is too small to split into train and val ({sum(counts.values())} "
                            f"tokens with val_fraction={val_fraction}); give a larger corpus")
    except BaseException:
        _discard(paths)
        raise
    for p in paths.values():
        os.replace(p + ".part", p)
    meta = {**tok.meta(), "dtype": token_dtype(tok.vocab_size).name, "source": corpus.source,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": documents,
            "skipped_files": skipped}
    with open(os.path.join(data_dir, "meta.json.part"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    os.replace(os.path.join(data_dir, "meta.json.part"), os.path.join(data_dir, "meta.json"))
    if verbose:
        skip_note = f", {skipped} binary file(s) skipped" if skipped else ""
        print(f"prepared {data_dir}: {tok.kind} vocab {tok.vocab_size:,}, {documents:,} document(s){skip_note}, "
              f"train {counts['train']:,} tokens, val {counts['val']:,} tokens "
              f"({corpus.size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s)")
    return meta


def prepare_chat(input_path: str, data_dir: str, tokenizer: str = "char", tokenizer_dir: str = "",
                 include: Sequence[str] = (), exclude: Sequence[str] = (), val_fraction: float = 0.1,
                 skip_bad_lines: bool = False, verbose: bool = True,
                 tokenizer_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Conversation JSONL (a file, or a directory's *.jsonl files by default) into data_dir's train.bin,
    val.bin, their loss masks train_mask.bin and val_mask.bin (uint8, 1 = an assistant token trained on)
    and meta.json, whose tokenizer metadata carries the chat template (jaxgpt.chat). val is the last
    val_fraction of the conversations (at least one). A bad line is an error naming file:line, or with
    skip_bad_lines is left out and counted. `tokenizer_meta`: a base model's tokenizer (and template)."""
    check_options(tokenizer, tokenizer_meta, val_fraction, data_dir)
    t0 = time.perf_counter()
    corpus = find_corpus(input_path, include or ("**/*.jsonl",), exclude, data_dir)
    convs = chat_lib.read_conversations(corpus.files, skip_bad_lines)
    if not convs.items:
        raise UserError(f"{input_path} holds no usable conversation ({len(convs.bad)} bad line(s)); give JSONL with "
                        f'one {{"messages": [...]}} a line')
    base = tok_lib.tokenizer_from_meta(chat_lib.plain_meta(tokenizer_meta)) if tokenizer_meta else None
    if tokenizer == "char":
        text = "".join(m["content"] for c in convs.items for m in c)
        if base is not None:
            kept = _drop_unknown_chars(text, base, verbose)
            if len(kept) != len(text):
                keep = set(base.chars)
                convs.items = [[{**m, "content": "".join(ch for ch in m["content"] if ch in keep) or " "} for m in c]
                               for c in convs.items]
        base = base or CharTokenizer.from_text(text)
    else:
        base = base or tok_lib.load_bpe(tokenizer_dir)
    tmpl = chat_lib.template_for(base, tokenizer_meta)
    n_val = max(1, round(val_fraction * len(convs.items)))
    if len(convs.items) - n_val < 1:
        raise UserError(f"{input_path} has {len(convs.items)} conversation(s), too few to split into train and val "
                        f"with val_fraction={val_fraction}; give more conversations")
    dtype = token_dtype(tmpl.vocab_size)
    parts = {"train": convs.items[:-n_val], "val": convs.items[-n_val:]}
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        os.remove(os.path.join(data_dir, "meta.json"))
    counts, learned = {}, {}
    for split, items in parts.items():
        ids, mask = chat_lib.encode_conversations(items, tmpl, dtype)
        if not mask.any():
            raise UserError(f"the {split} conversations of {input_path} have no assistant token to train on (every "
                            f"assistant message has weight 0); give conversations with answers")
        ids.tofile(os.path.join(data_dir, f"{split}.bin.part"))
        mask.tofile(os.path.join(data_dir, f"{split}_mask.bin.part"))
        counts[split], learned[split] = len(ids), int(mask.sum())
    for split in SPLITS:
        for name in (f"{split}.bin", f"{split}_mask.bin"):
            os.replace(os.path.join(data_dir, name + ".part"), os.path.join(data_dir, name))
    meta = {**tmpl.meta(), "dtype": dtype.name, "source": corpus.source, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "documents": len(corpus.files), "skipped_files": corpus.skipped,
            "conversations": len(convs.items), "skipped_lines": len(convs.bad),
            "train_assistant_tokens": learned["train"], "val_assistant_tokens": learned["val"]}
    with open(os.path.join(data_dir, "meta.json.part"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    os.replace(os.path.join(data_dir, "meta.json.part"), os.path.join(data_dir, "meta.json"))
    if verbose:
        if convs.bad:
            print(f"skipped {len(convs.bad)} bad line(s), the first: {convs.bad[0]}")
        print(f"prepared {data_dir}: chat, {tmpl.tokenizer.kind} vocab {tmpl.vocab_size:,} (template included), "
              f"{len(convs.items):,} conversation(s), train {counts['train']:,} tokens ({learned['train']:,} "
              f"assistant), val {counts['val']:,} tokens ({learned['val']:,} assistant) "
              f"({time.perf_counter() - t0:.1f}s)")
    return meta


def is_prepared(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, f)) for f in ("meta.json", "train.bin", "val.bin"))


def download(url: str, path: str) -> None:
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                        f"pass a local copy with --input_file=PATH") from None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, path)


def ensure_prepared(data_dir: str, dataset: str, input_file: str = "", tokenizer: str = "char",
                    tokenizer_dir: str = "", include: Sequence[str] = (), exclude: Sequence[str] = (),
                    tokenizer_meta: dict[str, Any] | None = None, chat: bool = False) -> dict[str, Any]:
    """Returns meta.json of data_dir, preparing it first from input_file (a file or directory) or
    a download if needed; the other arguments are prepare's (chat: input_file is conversation
    JSONL, prepared by prepare_chat)."""
    if chat and not is_prepared(data_dir):
        if not input_file:
            raise UserError(f"no prepared data in {data_dir}; pass the conversations with --input_file=FILE.jsonl or "
                            f"prepare them with python -m jaxgpt.prepare --chat --input FILE.jsonl --data_dir {data_dir}")
        prepare_chat(input_file, data_dir, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, include=include,
                     exclude=exclude, tokenizer_meta=tokenizer_meta)
    if not is_prepared(data_dir):
        if not input_file:
            if dataset not in DOWNLOADS:
                raise UserError(f"no prepared data in {data_dir} and no input_file; pass --input_file=PATH "
                                f"or prepare it with python -m jaxgpt.prepare --input FILE --data_dir {data_dir}")
            input_file = os.path.join(data_dir, "input.txt")
            if not os.path.isfile(input_file):
                download(DOWNLOADS[dataset], input_file)
        prepare(input_file, data_dir, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, include=include,
                exclude=exclude, tokenizer_meta=tokenizer_meta)
    meta = load_meta(data_dir)
    if chat and not chat_lib.has_chat(meta):
        raise UserError(f"{data_dir} holds text, not conversations; pass a new --data_dir for the chat data")
    return meta


_prep = group("prepare")


@dataclass(frozen=True)
class PrepareConfig:
    """Prepares a text file, or a directory of text files, for jaxgpt: train.bin, val.bin and meta.json in data_dir
    (train.py does this itself on first use)."""

    input: str = _prep("", nonempty("pass the text to prepare, e.g. --input=input.txt"),
                       "a UTF-8 text file, or a directory (each file one document)")
    data_dir: str = _prep("", nonempty("pass where to write it, e.g. --data_dir=data/mytext"),
                          "where to write train.bin, val.bin, meta.json")
    tokenizer: str = _prep("char", choice(*tok_lib.KINDS), "characters, or GPT-2's BPE")
    tokenizer_dir: str = _prep("", ANY, "gpt2: a Hugging Face directory with vocab.json + merges.txt")
    include: str = _prep("", ANY, "directory input: use only files matching these globs (comma-separated or "
                                  "repeated; ** spans directories)", multiple=True)
    exclude: str = _prep("", ANY, "directory input: skip files matching these globs (hidden ones always are)",
                         multiple=True)
    val_fraction: float = _prep(0.1, rng(0, 1, lo_open=True, hi_open=True), "share of the corpus held out for val")
    workers: int = _prep(0, rng(0, 1024), "gpt2: tokenizer processes (0 = automatic)")
    chat: bool = _prep(False, None, "input is conversation JSONL ({\"messages\": [...]} a line): writes the tokens "
                                   "with the chat template and a loss mask (docs/chat.md)")
    skip_bad_lines: bool = _prep(False, None, "chat: leave bad lines out (counted) instead of stopping at the first")


def main(argv=None) -> None:
    """python -m jaxgpt.prepare: exits with code 2 and one 'error: ...' line on a mistake."""

    def body(args):
        a = parse_args(args, PrepareConfig, prog="python -m jaxgpt.prepare")
        validate_fields(a)
        split = lambda s: [p.strip() for p in s.split(",") if p.strip()]  # noqa: E731
        if a.chat:
            prepare_chat(a.input, a.data_dir, tokenizer=a.tokenizer, tokenizer_dir=a.tokenizer_dir,
                         include=split(a.include), exclude=split(a.exclude), val_fraction=a.val_fraction,
                         skip_bad_lines=a.skip_bad_lines)
            return 0
        prepare(a.input, a.data_dir, tokenizer=a.tokenizer, tokenizer_dir=a.tokenizer_dir, include=split(a.include),
                exclude=split(a.exclude), val_fraction=a.val_fraction, workers=a.workers)
        return 0

    rc = run_cli(body, sys.argv[1:] if argv is None else list(argv))
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
