"""Every command shown in README.md and docs/*.md runs, or says why it cannot, so none goes stale.

A command is a line (with its `\\` continuations) of a fenced ```bash block; `&&` chains are split
into their parts. Each one is either run here (in a fresh directory per document, in the order the
document shows them, with fast overrides appended: a 1-layer, 32-channel model for two steps, a few
sampled tokens; later flags win in jaxgpt's parser) and must exit 0, or it is marked as not run
with a reason, in one of three ways:

    <!-- not run: REASON -->                  the line right before a block: none of its commands
    <!-- not run (P1, P2, ...): REASON -->    the same, only for the parts that start with P1, P2, ...
    # not run: REASON                         a comment line in a block: the next command only

A command with neither, or a program this file does not know how to run, fails the test, and so
does a marker that marks nothing. Commands that are not run are still checked for the files they
name (configs/*.py, scripts) and, for train.py, for keys that exist.

Placeholders are given something real: the corpus (`../shared/data/tinyshakespeare.txt`,
`input.txt`) is a small synthetic one, a repository (`path/to/your/repo`, ...) a directory of .py
files, `path/to/hf-gpt2-dir` a tiny GPT-2 directory written by transformers, `prompt.txt` a prompt,
`path/to/hellaswag_val.jsonl` a few examples in HellaSwag's format.
"""

import dataclasses
import glob
import json
import os
import re
import shlex
import string
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, WORDS, make_corpus, subprocess_env
from helpers import run_python

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = ("train.py", "sample.py", "export.py", "bench.py", "eval.py")
# helper scripts quick enough to run as shown (the others are marked with why not)
QUICK_SCRIPTS = ("scripts/synthetic_chat.py",)
# a 1-layer, 32-channel model for two steps, evaluated on one batch: what each training command gets
MODEL = ["--model_size=", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
         "--gradient_accumulation_steps=1"]
TRAIN = ["--max_iters=2", "--eval_iters=1", *MODEL]
# flags of every script that are not config keys
SCRIPT_FLAGS = {"config", "help", "debug", "compile_cache"}
NOT_RUN = re.compile(r"<!--\s*not run(?:\s*\(([^)]*)\))?\s*:\s*(.*?)\s*-->")


@dataclasses.dataclass
class Command:
    doc: str
    line: int  # where it starts in the document (1-based)
    argv: list[str]  # shell words, comments dropped
    not_run: str  # the reason; "" = run it

    def __str__(self):
        return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


def bash_blocks(text: str):
    """(line of the first command line, block lines, the marker line before the block or '')."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            j = lines.index("```", i + 1)
            yield i + 2, lines[i + 1:j], before.strip() if NOT_RUN.fullmatch(before.strip()) else ""
            i = j
        i += 1


def split_chain(words: list[str]) -> list[list[str]]:
    parts, part = [], []
    for w in words:
        if w == "&&":
            parts.append(part)
            part = []
        else:
            part.append(w)
    return parts + [part]


def commands(doc: str) -> list[Command]:
    """Every command of `doc`, in order, with its not-run reason; raises on a marker that marks nothing."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    out = []
    for start, block, marker in bash_blocks(text):
        scope, reason = (NOT_RUN.fullmatch(marker).groups() if marker else (None, ""))
        prefixes = [p.strip() for p in scope.split(",")] if scope else []
        used = set()
        pending, logical, first = "", "", None
        for k, raw in enumerate(block):
            line = raw.strip()
            if not logical and line.startswith("#"):
                m = re.match(r"#\s*not run:\s*(.+)", line)
                if m:
                    assert not pending, f"{doc}:{start + k}: two '# not run' lines in a row"
                    pending = m.group(1)
                continue
            if not line and not logical:
                continue
            first = start + k if not logical else first
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            lex = shlex.shlex(logical, posix=True, punctuation_chars="&")
            lex.whitespace_split, lex.commenters = True, "#"
            for part in split_chain(list(lex)):
                why = pending or (reason if not prefixes else "")
                for p in prefixes:
                    if shlex.join(part).startswith(p):
                        why = why or reason
                        used.add(p)
                out.append(Command(doc, first, part, why))
            pending, logical = "", ""
        assert not pending, f"{doc}: a '# not run' line at the end of the block at line {start} marks nothing"
        assert used == set(prefixes), f"{doc}: the marker before line {start} names {set(prefixes) - used}, which no command starts with"
    return out


def program(argv: list[str]) -> tuple[str, list[str]] | None:
    """(what runs, its arguments) for the commands this file knows how to run, else None."""
    if len(argv) >= 2 and argv[0] == "python" and (argv[1] in SCRIPTS or argv[1] in QUICK_SCRIPTS):
        return argv[1], argv[2:]
    if len(argv) >= 3 and argv[:2] == ["python", "-m"] and argv[2] in ("jaxgpt.prepare", "jaxgpt.launch"):
        return argv[2], argv[3:]
    return None


ALL = [c for d in DOCS for c in commands(d)]


def test_every_command_is_run_or_says_why_not():
    assert ALL, "no commands found"
    unknown = [str(c) for c in ALL if not c.not_run and program(c.argv) is None]
    assert not unknown, ("these commands are neither run by tests/test_docs.py nor marked "
                         "'<!-- not run: REASON -->' / '# not run: REASON':\n" + "\n".join(unknown))


def train_keys() -> set[str]:
    from jaxgpt.config import Config
    return {f.name for f in dataclasses.fields(Config)}


def test_commands_not_run_still_name_real_files_and_keys():
    """What a command that is not run can still get wrong: a config or a script that moved, a key
    that was renamed."""
    keys, bad = train_keys(), []
    for c in ALL:
        for w in c.argv:
            path = w.split("=", 1)[1] if w.startswith("--config=") else w
            if re.fullmatch(r"(configs|scripts)/[\w./-]+\.(py|sh)", path) and not os.path.exists(os.path.join(ROOT, path)):
                bad.append(f"{c}: {path} does not exist")
        prog = next((i for i, w in enumerate(c.argv) if w == "train.py"), None)
        if prog is not None:
            for w in c.argv[prog + 1:]:
                key = w[2:].split("=", 1)[0] if w.startswith("--") else None
                if key and key not in SCRIPT_FLAGS and key not in keys:
                    bad.append(f"{c}: train.py has no key {key!r}")
    assert not bad, "\n".join(bad)


def test_the_readme_is_a_front_door_of_at_most_300_lines():
    """What does not fit belongs in docs/ (linked from the README)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= 300, f"README.md has {n} lines; move details to docs/"


def test_the_configs_table_has_a_row_for_every_config():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        rows = set(re.findall(r"^\| `(configs/[\w.]+\.py)` \|", f.read(), re.M))
    files = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert rows == files, f"missing rows: {sorted(files - rows)}; rows without a file: {sorted(rows - files)}"


def test_the_file_tree_has_a_line_for_every_module_and_script():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        tree = f.read().split("## Files", 1)[1].split("```")[1]
    named = {line.split()[0].rstrip(",") for line in tree.strip().split("\n")} | set(re.findall(r"tests/\w+\.py", tree))
    files = [os.path.relpath(p, ROOT) for pat in ("jaxgpt/*.py", "scripts/*", "*.py") for p in glob.glob(os.path.join(ROOT, pat))]
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))
              if not os.path.basename(p).startswith("test_")]
    missing = sorted(f for f in files if f not in named and not f.endswith("__init__.py"))
    assert not missing, f"README.md's file tree has no line for {missing}"
    gone = sorted(n for n in named if "*" not in n and not os.path.exists(os.path.join(ROOT, n)))
    assert not gone, f"README.md's file tree names files that do not exist: {gone}"


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run is how the README's set-up commands are run; they must stay the same commands."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    setup = [c for c in ALL if c.doc == "README.md" and c.argv[:1] == ["pip"]]
    assert [c.argv for c in setup] == [["pip", "install", "-e", "."], ["pip", "install", "-e", ".[test]"]], setup
    assert "pip install -e '.[test]' && pytest\n" in ci
    assert any(c.argv == ["pytest"] for c in ALL if c.doc == "README.md")


# ---- running them

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("doc-inputs")
    # the synthetic corpus plus every printable character, so any prompt a document shows fits its vocabulary
    (d / "corpus.txt").write_text(make_corpus() + (string.printable.replace("\x0b", "").replace("\x0c", "") * 20),
                                  encoding="utf-8")
    (d / "repo" / "pkg").mkdir(parents=True)
    for i in range(3):
        (d / "repo" / "pkg" / f"m{i}.py").write_text(make_corpus(2000, seed=i) + string.printable[:94] + "\n",
                                                    encoding="utf-8")
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731  (one-word endings: the 16-token model)
    (d / "hellaswag.jsonl").write_text("".join(json.dumps({"ctx": words(12), "endings": [words(1) for _ in range(4)],
                                                           "label": i % 4}) + "\n" for i in range(8)))
    return d


def substituted(argv: list[str], inputs, hf_dir) -> list[str]:
    places = {"../shared/data/tinyshakespeare.txt": inputs / "corpus.txt", "input.txt": inputs / "corpus.txt",
              "path/to/your/repo": inputs / "repo", "path/to/repo": inputs / "repo",
              "path/to/a/python/tree": inputs / "repo", "path/to/hf-gpt2-dir": hf_dir,
              "path/to/hellaswag_val.jsonl": inputs / "hellaswag.jsonl"}
    out = []
    for w in argv:
        for ph, real in places.items():
            if w == ph or w.endswith("=" + ph):
                w = w[:len(w) - len(ph)] + str(real() if callable(real) else real)
        out.append(w)
    return out


def runnable(c: Command, inputs, hf_dir) -> list[str]:
    """The command as this test runs it: its own arguments, then the fast overrides."""
    prog, args = program(c.argv)
    args = substituted(args, inputs, hf_dir)
    resumes = any(a in ("--init_from=resume", "--eval_only=True") for a in args)
    train = TRAIN[:]
    if resumes:
        train[0] = "--max_iters=4"  # two more steps than the run it continues
    elif not any(a.startswith("--input_file=") for a in args):
        train.append(f"--input_file={inputs / 'corpus.txt'}")  # offline: never the download
    extra = {"train.py": train, "jaxgpt.launch": train, "sample.py": ["--max_new_tokens=8"],
             "bench.py": MODEL + ["--steps=2"] + (["--sample_tokens=8"] if any("sample_tokens" in a for a in args) else []),
             "export.py": [], "eval.py": [], "jaxgpt.prepare": []}.get(prog, [])
    head = [sys.executable, "-m", prog] if prog.startswith("jaxgpt.") else [sys.executable, os.path.join(ROOT, prog)]
    return head + args + extra


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(not c.not_run for c in commands(d))])
def test_the_commands_of_a_document_run(doc, inputs, tmp_path, request):
    """In a fresh directory holding configs/, scripts/ and prompt.txt, each command the document
    runs, in order (a later one samples or resumes what an earlier one trained), exits 0."""
    for name in ("configs", "scripts", *SCRIPTS):  # launch starts train.py from the working directory
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "prompt.txt").write_text("ROMEO:", encoding="utf-8")
    env = subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    hf_dir = lambda: request.getfixturevalue("tiny_gpt2_dir")  # noqa: E731  (built only where a document needs it)
    for c in (c for c in commands(doc) if not c.not_run):
        argv = runnable(c, inputs, hf_dir)
        t = time.perf_counter()
        r = run_python(argv[1:], cwd=tmp_path, env=env, timeout=300)  # python ARGS, forked from tests/zygote.py
        assert r.returncode == 0, f"{c}\nran as: {shlex.join(argv)}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        print(f"{time.perf_counter() - t:5.1f} s  {c}")
