"""Evaluate a model: multiple-choice benchmarks in HellaSwag's format, and bits per byte over text.

    python eval.py --out_dir=out-shakespeare-char-cpu --task=bpb --data=input.txt
    python eval.py --init_from=gpt2 --task=hellaswag --data=hellaswag_val.jsonl        # llm.c's scoring
    python eval.py --init_from=gpt2 --task=mc --data=questions.jsonl --limit=100        # question, choices, answer

hellaswag: HellaSwag's jsonl (ctx, endings, label); mc: a generic multiple-choice jsonl (question,
choices, answer). Both are scored as llm.c scores HellaSwag (jaxgpt.evaluate): the log-likelihood
of each " " + ending given the context; acc by the sum, acc_norm by the mean per token; acc_chars
and acc_bytes are lm-evaluation-harness's acc_norm and acc_bytes. bpb: bits per byte and
perplexity of a text file or of every file under a directory, with the model's own tokenizer, in
windows of block_size tokens advancing by --stride. Every flag and the whole data file are checked
before the model loads; bad data is one line naming file:line. Examples/s (or tokens/s) count the
scoring alone; compilation (one program per length bucket) is reported apart. See docs/evaluate.md.
"""

import json
import os
import sys
from dataclasses import dataclass

from jaxgpt.cli import run_cli
from jaxgpt.config import ModelSource, allows, choice, group, parse_args, rng, validate_fields
from jaxgpt.errors import UserError
from jaxgpt.evaluate import Scorer, bits_per_byte, read_choices, read_texts, score_choices
from jaxgpt.loading import load
from jaxgpt.parallel import launched_index

_what = group("what to evaluate")
_how = group("batching")


@allows("an existing file (or, for bpb, a directory)")
def existing_path(key: str, path: str) -> None:
    if not path.strip():
        raise UserError(f"{key} is empty; pass the file to evaluate on, e.g. --{key}=hellaswag_val.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{key} {path} does not exist; pass a jsonl file (hellaswag, mc) or a text file or "
                        f"directory (bpb)")


@dataclass(frozen=True)
class EvalConfig(ModelSource):
    """Evaluates a trained jaxgpt run (its out_dir alone), GPT-2 weights, a Hugging Face GPT-2 directory or a
    nanoGPT ckpt.pt: multiple-choice accuracy (HellaSwag's format, llm.c's scoring) or bits per byte."""

    task: str = _what("hellaswag", choice("hellaswag", "mc", "bpb"),
                      "hellaswag: jsonl of ctx, endings, label; mc: jsonl of question, choices, answer; "
                      "bpb: bits per byte of text")
    data: str = _what("", existing_path, "the jsonl file (hellaswag, mc), or a text file or directory (bpb)")
    limit: int = _what(0, rng(0, note="(0 = all)"), "score only the first this many examples (hellaswag, mc)")
    stride: int = _what(0, rng(0, note="(0 = block_size // 2)"),
                        "bpb: tokens each window of block_size advances; each token has at least "
                        "block_size - stride tokens of context")
    batch_tokens: int = _how(8192, rng(1, 1 << 24), "tokens per compiled batch (rows of one length bucket "
                                                    "are batched up to this)")


def eval_main(argv):
    if launched_index() > 0:  # started as a job of several processes: process 0 evaluates (and reports) alone
        return 0
    ec = parse_args(argv, EvalConfig)
    validate_fields(ec)
    if ec.task == "bpb":
        if ec.limit:
            raise UserError("limit counts examples of hellaswag and mc; bpb scores the whole text (drop --limit)")
        texts = read_texts(ec.data)
    else:
        if ec.stride:
            raise UserError(f"stride sets bpb's windows; --task={ec.task} scores each example whole (drop --stride)")
        questions = read_choices(ec.data, ec.task, ec.limit)
    resume = ec.init_from == "resume"
    graphdef, params, model_cfg, tok, _ = load(ec.out_dir if resume else ec.init_from, ec.which, run=resume,
                                               meta_pkl=ec.meta_pkl)
    scorer = Scorer(graphdef, params, model_cfg.block_size, tok.vocab_size, ec.batch_tokens)
    if ec.task == "bpb":
        r = bits_per_byte(scorer, texts, tok, ec.stride)
        print(f"bpb {r.bpb:.4f}  perplexity {r.perplexity:.4f}  loss {r.loss:.4f} nats/token")
        print(f"{r.tokens:,} tokens ({r.bytes:,} bytes, {r.documents} document{'s' * (r.documents != 1)}) in "
              f"{r.seconds:.2f} s: {r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s; compilation "
              f"{r.compile_seconds:.2f} s ({r.programs} program{'s' * (r.programs != 1)}, not counted)", file=sys.stderr)
        summary = {"task": "bpb", "bpb": r.bpb, "perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens,
                   "bytes": r.bytes}
    else:
        r = score_choices(scorer, questions, tok)
        m = r.metrics
        print(f"acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f}  (lm-eval's acc_norm, by characters: "
              f"{m['acc_chars']:.4f}; acc_bytes {m['acc_bytes']:.4f})  on {r.examples} examples")
        cut = f"; {r.cut} endings had their context cut to fit block_size" if r.cut else ""
        print(f"{r.examples} examples in {r.seconds:.2f} s: {r.examples_per_second:,.1f} examples/s; compilation "
              f"{r.compile_seconds:.2f} s ({r.programs} program{'s' * (r.programs != 1)}, not counted){cut}", file=sys.stderr)
        summary = {"task": ec.task, **m, "examples": r.examples, "examples_per_second": r.examples_per_second}
    print(json.dumps(summary))
    return 0


def main(argv):
    return run_cli(eval_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
