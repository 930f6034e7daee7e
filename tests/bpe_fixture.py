"""A real, small GPT-2-style BPE for offline tests: trained on any text in well under a second,
and written out as a Hugging Face GPT-2 tokenizer directory (vocab.json + merges.txt).

    enc = train_tiny_bpe(make_corpus(), n_merges=200)   # a tiktoken.Encoding
    write_hf_tokenizer_files(enc, tmp_path / "tok")      # then --tokenizer_dir=tmp_path/tok
"""

from __future__ import annotations

import collections

import regex
import tiktoken

from jaxgpt.tokenizer import GPT2_PATTERN, BPETokenizer

EOT = "<|endoftext|>"


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters, spelled out from its definition: the printable
    ranges '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves, the other bytes become 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


def _conflicts(new: bytes, pair: tuple[bytes, bytes], tokens: set[bytes]) -> bool:
    """Whether `new` could be formed from two tokens other than `pair`, or would give an existing
    token a second such split. tiktoken merges any two adjacent tokens whose concatenation is a
    token, Hugging Face only the listed pair: with one split per token both encode alike."""
    if new in tokens:
        return True
    if any(new[:k] in tokens and new[k:] in tokens and (new[:k], new[k:]) != pair for k in range(1, len(new))):
        return True
    return any(len(t) > len(new) and ((t.startswith(new) and t[len(new):] in tokens)
                                      or (t.endswith(new) and t[:-len(new)] in tokens)) for t in tokens)


def train_tiny_bpe(text: str, n_merges: int = 200, name: str = "tiny-bpe") -> tiktoken.Encoding:
    """Byte-level BPE learned on `text`: ranks 0-255 are the single bytes, then up to `n_merges`
    greedy merges of the most frequent adjacent pair within GPT-2 pre-tokens, then <|endoftext|>."""
    words = collections.Counter(m.encode("utf-8") for m in regex.findall(GPT2_PATTERN, text))
    seqs = [list(w) for w in words]  # token ids per distinct pre-token
    freqs = list(words.values())
    vocab = [bytes([b]) for b in range(256)]
    tokens = set(vocab)
    counts: collections.Counter = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words that (may) hold it
    for i, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            counts[p] += freqs[i]
            where[p].add(i)
    banned = set()
    while len(vocab) < 256 + n_merges:
        best = max(((c, p) for p, c in counts.items() if c > 0 and p not in banned), default=None)
        if best is None:
            break
        a, b = best[1]
        new = vocab[a] + vocab[b]
        if _conflicts(new, (vocab[a], vocab[b]), tokens):
            banned.add((a, b))  # conflicts only grow with the vocabulary: banned for good
            continue
        idx = len(vocab)
        vocab.append(new)
        tokens.add(new)
        for i in where.pop((a, b)):
            s, out, j = seqs[i], [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(idx)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            if len(out) == len(s):
                continue  # a stale entry: the pair had already left this word
            for p in zip(s, s[1:]):
                counts[p] -= freqs[i]
            for p in zip(out, out[1:]):
                counts[p] += freqs[i]
                where[p].add(i)
            seqs[i] = out
        counts.pop((a, b), None)
    ranks = {t: r for r, t in enumerate(vocab)}
    return tiktoken.Encoding(f"{name}-{len(vocab) - 256}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(vocab)})


def write_hf_tokenizer_files(enc: tiktoken.Encoding, directory) -> None:
    """Writes `enc` as a Hugging Face GPT-2 tokenizer directory, through the library's writer
    (what export.py uses); test_bpe_data checks the files against transformers' own tokenizer."""
    BPETokenizer(enc).write_hf_files(str(directory))
