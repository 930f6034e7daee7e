"""The front door: --help on every entry point, every key declared with a help line and a rule,
docs/config.md generated from the declarations, and what --help and config files show."""

import os
from dataclasses import fields

import pytest

from conftest import ROOT, entry_points, subprocess_env
from helpers import run_python
from jaxgpt.config import Config, declared, keys_markdown, parse_args, rules_of
from jaxgpt.errors import ShowHelp, UserError


@pytest.mark.parametrize("command", list(entry_points()))
@pytest.mark.slow
def test_help_lists_every_key_with_its_default_and_exits_0(command):
    cls = entry_points()[command]
    p = run_python([*command.split(), "--help"], env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=120)
    assert p.returncode == 0, p.stderr
    for f in declared(cls):
        assert f"--{f.name}={f.default!r}" in p.stdout, f"{command} --help misses {f.name}"


def test_every_key_has_a_help_line_and_a_rule():
    for cls in entry_points().values():
        assert [f.name for f in fields(cls) if f.name != "GROUPS"] == [f.name for f in declared(cls)], \
            f"{cls.__name__}: a field without a help line"
        for f in declared(cls):
            assert f.metadata["help"].strip(), f"{cls.__name__}.{f.name}: empty help"
            assert f.metadata["rule"] is not None or f.type in (bool, "bool"), f"{cls.__name__}.{f.name}: no rule"
    assert set(Config.RULES) == set(rules_of(Config))


def test_config_help_shows_a_files_values_and_where_they_come_from():
    with pytest.raises(ShowHelp) as e:
        parse_args(["--config", "configs/shakespeare_char_cpu.py", "--max_iters=7", "--help"])
    text = str(e.value)
    assert "--n_layer=4 (from configs/shakespeare_char_cpu.py:" in text
    assert "--max_iters=7 (set)" in text and "--dropout=" in text


def test_flag_forms_and_a_validated_config_is_frozen():
    cfg = parse_args(["--max_iters", "5", "--eval_only", "--bias=True"])
    assert (cfg.max_iters, cfg.eval_only, cfg.bias) == (5, True, True)
    with pytest.raises(UserError, match="--max_iters=VALUE"):
        parse_args(["--max_iters"])
    v = Config(model_size="gpt2-medium", n_head=16).validate()
    assert (v.n_layer, v.n_head, v.n_embd) == (24, 16, 1024) and v.validate() is v
    with pytest.raises(Exception):
        v.max_iters = 3  # nothing changes a config once it is validated


def test_the_key_doc_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        assert f.read().strip() == keys_markdown(entry_points()).strip(), \
            "docs/config.md is out of date: python scripts/write_config_doc.py"


def test_prepare_takes_repeated_globs(tmp_path):
    from jaxgpt.prepare import PrepareConfig

    a = parse_args(["--input=x", "--data_dir=d", "--include=*.py", "--include", "**/*.md"], PrepareConfig)
    assert a.include == "*.py,**/*.md"


@pytest.mark.slow
def test_a_resume_names_the_settings_it_keeps(tmp_path, corpus_file):
    """A resumed run keeps its checkpoint's finetuning settings: the printed config shows them,
    and a flag that asked otherwise is named in one line."""
    from conftest import tiny_args
    from jaxgpt.trainer import train

    train(parse_args(tiny_args(tmp_path, corpus_file, max_iters=2)), log=lambda s: None)
    lines = []
    train(parse_args(tiny_args(tmp_path, corpus_file, max_iters=3, init_from="resume", lora_rank=4)), log=lines.append)
    notes = [line for line in lines if line.startswith("note: a resumed run keeps")]
    assert notes == ["note: a resumed run keeps its checkpoint's lora_rank=8 (asked 4)"]
    assert "  lora_rank = 8" in next(line for line in lines if line.startswith("config:"))


def test_a_run_made_before_the_restructuring_resumes_as_it_did(tmp_path):
    """tests/fixtures/old_run: a run written by the code before every key was declared once (a43fa8d);
    resumed today, it logs the losses that code logged (CPU float32: the same ops in the same order)."""
    import json
    import shutil

    from jaxgpt.trainer import train

    old = os.path.join(ROOT, "tests", "fixtures", "old_run")
    shutil.copytree(os.path.join(old, "run"), tmp_path / "run")
    with open(os.path.join(old, "run", "config.json")) as f:
        saved = json.load(f)
    argv = [f"--{k}={v}" for k, v in saved.items() if k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                            "eval_iters", "eval_interval", "warmup_iters",
                                                            "lr_decay_iters", "learning_rate", "min_lr")]
    train(parse_args(argv + [f"--out_dir={tmp_path / 'run'}", f"--data_dir={os.path.join(old, 'data')}",
                             "--init_from=resume", "--max_iters=6", "--cpu_devices=1"]), log=lambda s: None)
    rows = {r["iter"]: r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))}
    want = {r["iter"]: r for r in map(json.loads, open(os.path.join(old, "continued_metrics.jsonl")))}
    for key in ("train_loss", "val_loss"):
        assert rows[6][key] == pytest.approx(want[6][key], rel=1e-5), key
