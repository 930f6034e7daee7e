"""A synthetic conversation set in OpenAI's chat format, for trying chat finetuning offline: each line
{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} asks a task whose answer is checkable.

    python scripts/synthetic_chat.py --task=reverse --n=6000 --out=data/chat_reverse.jsonl
    python scripts/synthetic_chat.py --task=add --n=6000 --out=data/chat_add.jsonl --held_out=100

reverse: a word of 3 to 6 letters from a-h, answered reversed ("cabd" -> "dbac").
add: two numbers below 50, answered with their sum ("12+7" -> "19").
--held_out=N writes the last N distinct prompts to OUT.held.jsonl instead (prompts the training set
never shows, for measuring exact answers; tests/test_chat.py does the same for reverse).
--system=TEXT adds a system message to every conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import random


def prompts(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to n distinct (question, answer) pairs in a random order."""
    r = random.Random(seed)
    if task == "reverse":
        made = {"".join(r.choice("abcdefgh") for _ in range(r.randint(3, 6))) for _ in range(n)}
        pairs = [(w, w[::-1]) for w in sorted(made)]
    else:
        pairs = [(f"{a}+{b}", str(a + b)) for a in range(50) for b in range(50)]
    r.shuffle(pairs)
    return pairs[:n]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("reverse", "add"), default="reverse")
    p.add_argument("--n", type=int, default=6000, help="conversations (distinct prompts) to make")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--held_out", type=int, default=0, help="prompts kept out, written to OUT.held.jsonl")
    p.add_argument("--system", default="", help="a system message for every conversation")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    pairs = prompts(a.task, a.n, a.seed)
    held, train = pairs[:a.held_out], pairs[a.held_out:]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    for path, part in ((a.out, train), (a.out.removesuffix(".jsonl") + ".held.jsonl", held)):
        if not part and path != a.out:
            continue
        with open(path, "w", encoding="utf-8") as f:
            for q, ans in part:
                msgs = [{"role": "system", "content": a.system}] if a.system else []
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
                f.write(json.dumps({"messages": msgs}) + "\n")
        print(f"wrote {len(part)} conversations to {path}")


if __name__ == "__main__":
    main()
