"""eval.py and jaxgpt.evaluate: per-ending log-likelihoods equal transformers' GPT2LMHeadModel's on a
GPT-2-shaped model with random weights, and acc / acc_norm a NumPy re-scoring of them; bits per byte
equals the log-likelihoods transformers gives over the same windows; a file compiles one program per
length bucket; bad data is one line naming file:line; lm-evaluation-harness's local-completions
model, through serve.py, gets eval.py's accuracies."""

import glob
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import eval as eval_script
from conftest import ROOT, WORDS, make_corpus, subprocess_env, tiny_args
from jaxgpt.evaluate import Scorer, bits_per_byte, choice_rows, read_choices, score_choices, windows
from jaxgpt.loading import load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T_CTX = 64
# log-likelihoods are compared with transformers' float32 ones at 1e-4 (sums of up to 64 terms)
ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("exact_f32")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-shaped model (GPT2LMHeadModel: learned positions, LayerNorms with biases, tied head,
    gelu_new) with every tensor random, 2 layers, 4 heads, 32 channels, context 64, and the small
    offline BPE (GPT-2's own BPE files cannot be downloaded here)."""
    from bpe_fixture import train_tiny_bpe, write_hf_tokenizer_files

    d = tmp_path_factory.mktemp("gpt2")
    enc = train_tiny_bpe(make_corpus(), n_merges=150)
    write_hf_tokenizer_files(enc, d)
    cfg = transformers.GPT2Config(vocab_size=enc.n_vocab, n_positions=T_CTX, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=enc.eot_token, eos_token_id=enc.eot_token)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the endings' likelihoods differ clearly
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "ln_" in name else 0.1) + (1.0 if name.endswith(".weight") and "ln_" in name else 0.0))
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def hf(gpt2_dir):
    return (transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval(),
            transformers.AutoTokenizer.from_pretrained(gpt2_dir))


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def write_hellaswag(path, n, seed=0, ctx_words=(3, 25), endings=4):
    """n examples in HellaSwag's jsonl format (ctx, endings, label, plus fields the scorer ignores)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"ind": i, "activity_label": "Reading", "ctx": words(rng, *ctx_words).capitalize() + ",",
                                "endings": [words(rng, 1, 10) + "." for _ in range(endings)],
                                "label": int(rng.integers(endings)), "split": "val"}) + "\n")
    return str(path)


def hf_loglikelihood(hf, context, ending):
    """transformers' float32 log-likelihood of " " + ending after context, tokenized as llm.c does
    (each part on its own), the context cut from the left to fit the context window."""
    model, tok = hf
    ctx, end = tok.encode(context), tok.encode(" " + ending)
    ids = (ctx + end)[-(T_CTX + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    return float(lp[-len(end):].sum(dtype=np.float64)), len(end)


def scored(gpt2_dir, path, task="hellaswag", batch_tokens=8192, limit=0):
    graphdef, params, cfg, tok, _ = load(gpt2_dir, dtype="float32")
    scorer = Scorer(graphdef, params, cfg.block_size, tok.vocab_size, batch_tokens)
    questions = read_choices(path, task, limit)
    return score_choices(scorer, questions, tok), questions, scorer


def test_loglikelihoods_equal_transformers_and_accuracies_a_numpy_rescoring(gpt2_dir, hf, tmp_path):
    path = write_hellaswag(tmp_path / "hs.jsonl", 24)
    result, questions, _ = scored(gpt2_dir, path)
    ref = [hf_loglikelihood(hf, q.context, e) for q in questions for e in q.endings]
    np.testing.assert_allclose(result.loglikelihoods, [r[0] for r in ref], atol=ATOL, rtol=0)
    total = np.array([r[0] for r in ref]).reshape(-1, 4)
    ntok = np.array([r[1] for r in ref]).reshape(-1, 4)
    labels = np.array([q.label for q in questions])
    assert result.metrics["acc"] == np.mean(total.argmax(1) == labels)
    assert result.metrics["acc_norm"] == np.mean((total / ntok).argmax(1) == labels)
    chars = np.array([[len(e) for e in q.endings] for q in questions])
    assert result.metrics["acc_chars"] == np.mean((total / chars).argmax(1) == labels)
    # the endings' scores do differ: the accuracies are not those of ties
    assert np.all(np.ptp(total, axis=1) > 1e-2)


def test_a_generic_multiple_choice_file_takes_the_same_path(gpt2_dir, tmp_path):
    """question, choices (any number, here 2 to 5), answer: the same scores as the same examples in
    HellaSwag's fields."""
    rng = np.random.default_rng(3)
    rows = [{"question": words(rng, 2, 12), "choices": [words(rng, 1, 6) for _ in range(int(rng.integers(2, 6)))]}
            for _ in range(12)]
    for r in rows:
        r["answer"] = int(rng.integers(len(r["choices"])))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps({"ctx": r["question"], "endings": r["choices"],
                                                           "label": r["answer"]}) + "\n" for r in rows))
    mc, _, _ = scored(gpt2_dir, str(tmp_path / "mc.jsonl"), task="mc")
    hs, _, _ = scored(gpt2_dir, str(tmp_path / "hs.jsonl"))
    assert len(mc.loglikelihoods) == sum(len(r["choices"]) for r in rows)
    assert mc.loglikelihoods == hs.loglikelihoods and mc.metrics == hs.metrics


def test_a_file_compiles_one_program_per_length_bucket_and_batching_changes_no_score(gpt2_dir, tmp_path):
    """60 examples of 2 to 40 words: rows of lengths 4..64 fall in the buckets 16, 32, 64; a batch
    of 64 tokens or of 8192 gives the same log-likelihoods (float32 rounding aside: 1e-5)."""
    path = write_hellaswag(tmp_path / "hs.jsonl", 60, seed=1, ctx_words=(1, 40))
    big, questions, scorer = scored(gpt2_dir, path)
    graphdef, params, cfg, tok, _ = load(gpt2_dir, dtype="float32")
    rows, _ = choice_rows(questions, tok, cfg.block_size)
    buckets = {scorer.length(len(r.tokens) - 1) for r in rows}
    assert big.programs == len(buckets) and len(buckets) >= 2
    small, _, small_scorer = scored(gpt2_dir, path, batch_tokens=64)
    assert small_scorer.programs == len(buckets)
    np.testing.assert_allclose(small.loglikelihoods, big.loglikelihoods, atol=1e-5, rtol=0)


def test_a_long_context_keeps_its_last_tokens(gpt2_dir, hf, tmp_path):
    """Contexts of 60 to 90 words (more than the 64-token window): cut from the left to block_size + 1
    tokens with the ending, what transformers gives on those tokens."""
    path = write_hellaswag(tmp_path / "hs.jsonl", 4, seed=2, ctx_words=(60, 90))
    result, questions, _ = scored(gpt2_dir, path)
    assert result.cut == 16
    ref = [hf_loglikelihood(hf, q.context, e)[0] for q in questions for e in q.endings]
    np.testing.assert_allclose(result.loglikelihoods, ref, atol=ATOL, rtol=0)


def test_windows_score_every_token_once_with_enough_context():
    for n, T, stride in [(2, 8, 4), (9, 8, 4), (10, 8, 4), (50, 8, 4), (50, 8, 8), (50, 8, 1), (33, 16, 5)]:
        seen = []
        for lo, s, e in windows(n, T, stride):
            assert e - lo <= T + 1 and lo <= s - 1 < e  # the row fits the model; its targets have their inputs
            seen += range(s, e)
            assert all(j - lo >= min(j, T - stride + 1) for j in range(s, e))  # context: all, or >= T - stride + 1
        assert seen == list(range(1, n)), (n, T, stride)


@pytest.mark.parametrize("stride", [0, 64, 7])
def test_bits_per_byte_is_transformers_loglikelihood_over_the_same_windows(gpt2_dir, hf, tmp_path, stride):
    """A document of about 5 windows and a short one, in a directory: the summed negative log-likelihood
    is transformers' over the windows (each window scores its own new tokens), every token after
    <|endoftext|> scored once, and bits per byte divides by the texts' UTF-8 bytes."""
    model, hftok = hf
    docs = {"a.txt": make_corpus(200, seed=4) + "naïve café\n", "sub/b.txt": "to be or not"}
    for name, text in docs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / ".hidden").write_text("not scored")
    graphdef, params, cfg, tok, _ = load(gpt2_dir, dtype="float32")
    from jaxgpt.evaluate import read_texts
    r = bits_per_byte(Scorer(graphdef, params, cfg.block_size, tok.vocab_size), read_texts(str(tmp_path)), tok, stride)
    nll, n_tok = 0.0, 0
    for text in docs.values():
        seq = [tok.eot] + hftok.encode(text)
        for lo, s, e in windows(len(seq), T_CTX, stride or T_CTX // 2):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([seq[lo:e - 1]])).logits[0].float(), -1)
            lp = lp.gather(1, torch.tensor(seq[lo + 1:e])[:, None])[:, 0].numpy()
            nll -= float(lp[-(e - s):].sum(dtype=np.float64))
            n_tok += e - s
        assert len(seq) > 2 * T_CTX or text == docs["sub/b.txt"]
    assert (r.tokens, r.documents, r.bytes) == (n_tok, 2, sum(len(t.encode()) for t in docs.values()))
    assert n_tok == sum(len(hftok.encode(t)) for t in docs.values())
    assert r.nll == pytest.approx(nll, abs=1e-5 * n_tok, rel=0)  # float32 per token: 1e-5
    assert r.bpb == pytest.approx(r.nll / math.log(2) / r.bytes, rel=1e-12)
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens), rel=1e-12)


# -- eval.py ------------------------------------------------------------------------------------------

def run(capsys, *args):
    code = eval_script.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_py_prints_the_accuracies_and_examples_per_second(gpt2_dir, tmp_path, capsys):
    path = write_hellaswag(tmp_path / "hs.jsonl", 20, seed=5)
    code, out, err = run(capsys, f"--init_from={gpt2_dir}", "--task=hellaswag", f"--data={path}", "--limit=8")
    assert code == 0, err
    summary = json.loads(out.strip().split("\n")[-1])
    expected, _, _ = scored(gpt2_dir, path, limit=8)
    assert summary["examples"] == 8
    assert {k: summary[k] for k in expected.metrics} == expected.metrics
    assert f"acc {expected.metrics['acc']:.4f}  acc_norm {expected.metrics['acc_norm']:.4f}" in out
    assert "8 examples in " in err and "examples/s; compilation" in err


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    from jaxgpt.config import parse_args
    from jaxgpt.trainer import train

    tmp = tmp_path_factory.mktemp("char")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(tmp, str(corpus), max_iters=4, eval_interval=4))
    train(cfg, log=lambda s: None)
    return cfg.out_dir, str(corpus)


def test_eval_py_bits_per_byte_of_a_char_run(char_run, capsys):
    """A character model scores every character but the first: bytes = the file's bytes - 1."""
    out_dir, corpus = char_run
    code, out, err = run(capsys, f"--out_dir={out_dir}", "--task=bpb", f"--data={corpus}", "--stride=8")
    assert code == 0, err
    summary = json.loads(out.strip().split("\n")[-1])
    text = open(corpus, encoding="utf-8").read()
    assert summary["tokens"] == len(text) - 1 and summary["bytes"] == len(text.encode()) - 1
    assert 0 < summary["bpb"] < 8 and summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))


BAD = [
    ('{"ctx": "to be", "endings": ["a", "b"]}', 2, "missing field 'label'"),
    ('{"ctx": "to be", "endings": ["a", "b"], "label": 2}', 2, "label 2 is out of range"),
    ('{"ctx": "to be", "endings": ["a", "  "], "label": 0}', 2, "endings[1] is empty"),
    ('{"ctx": "to be", "endings": ["a"], "label": 0}', 2, "endings must be a list of at least two strings"),
    ('{"ctx": "to be", "endings": ["a", "b"], "label": "x"}', 2, "label must be the index"),
    ('{"ctx": "to be", "endings": ["a", "b"], ', 2, "not valid JSON"),
]


@pytest.mark.parametrize("line, at, says", BAD)
def test_bad_data_is_one_line_naming_file_and_line_before_the_model_loads(tmp_path, capsys, line, at, says):
    """The out_dir does not exist: the data's error comes first, as one line, exit 2."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "fine", "endings": ["a", "b"], "label": 1}\n' + line + "\n")
    code, out, err = run(capsys, f"--out_dir={tmp_path / 'none'}", f"--data={path}")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {path}:{at}: ") and says in err and err.count("\n") == 1, err


def test_an_ending_outside_a_char_models_vocabulary_names_its_line(char_run, tmp_path, capsys):
    path = tmp_path / "hs.jsonl"
    path.write_text('{"ctx": "to be", "endings": ["or not", "that"], "label": 0}\n'
                    '{"ctx": "to be", "endings": ["or not", "Ω"], "label": 0}\n')
    code, _, err = run(capsys, f"--out_dir={char_run[0]}", f"--data={path}")
    assert code == 2 and err.startswith(f"error: {path}:2: text contains 1 character(s) outside the vocabulary"), err


@pytest.mark.parametrize("args, says", [
    (["--task=bpb", "--limit=3"], "limit counts examples"),
    (["--task=hellaswag", "--stride=3"], "stride sets bpb's windows"),
    (["--task=bpb", "--data=nowhere.txt"], "data nowhere.txt does not exist"),
    (["--task=mmlu"], "task must be one of"),
])
def test_bad_flags_are_one_line(capsys, tmp_path, args, says):
    (tmp_path / "t.txt").write_text("to be")
    data = [] if any(a.startswith("--data") for a in args) else [f"--data={tmp_path / 't.txt'}"]
    code, _, err = run(capsys, f"--out_dir={tmp_path / 'none'}", *data, *args)
    assert code == 2 and says in err and err.count("\n") == 1, err


# -- lm-evaluation-harness through serve.py ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASK_YAML = """task: jaxgpt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


@pytest.mark.slow
def test_lm_eval_harness_through_serve_py_gets_eval_pys_accuracies(gpt2_dir, tmp_path, capsys):
    """docs/evaluate.md's commands: serve.py, then lm_eval's local-completions model (echo + logprobs)
    on the same jsonl as a local task. Its acc is eval.py's acc, its acc_norm (by characters) and
    acc_bytes are eval.py's acc_chars and acc_bytes, and each ending's log-likelihood agrees (1e-4)."""
    pytest.importorskip("lm_eval")
    data = write_hellaswag(tmp_path / "hs.jsonl", 40, seed=6)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "jaxgpt_mc.yaml").write_text(TASK_YAML.format(data=data))
    code, out, err = run(capsys, f"--init_from={gpt2_dir}", f"--data={data}")
    assert code == 0, err
    ours = json.loads(out.strip().split("\n")[-1])
    expected, _, _ = scored(gpt2_dir, data)

    port = free_port()
    env = subprocess_env(JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                         HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    server = subprocess.Popen([sys.executable, "serve.py", f"--init_from={gpt2_dir}", f"--port={port}", "--slots=4"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() - t0 < 240, \
                    server.stderr.read() if server.poll() is not None else "serve.py did not start in 240 s"
                time.sleep(0.5)
        lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
        r = subprocess.run([lm_eval, "--model", "local-completions", "--model_args",
                            f"model=jaxgpt,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                            f"tokenizer={gpt2_dir},max_length={T_CTX}", "--tasks", "jaxgpt_mc",
                            "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "lm-out"),
                            "--log_samples"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    results = json.load(open(glob.glob(str(tmp_path / "lm-out" / "*" / "results_*.json"))[0]))["results"]["jaxgpt_mc"]
    assert results["acc,none"] == ours["acc"]
    assert results["acc_norm,none"] == ours["acc_chars"]
    assert results["acc_bytes,none"] == ours["acc_bytes"]
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "lm-out" / "*" / "samples_jaxgpt_mc_*.jsonl"))[0])]
    theirs = [float(ll) for s in sorted(samples, key=lambda s: s["doc_id"]) for ll, _ in (resp[0] for resp in s["resps"])]
    np.testing.assert_allclose(theirs, expected.loglikelihoods, atol=ATOL, rtol=0)
