import pytest

from jaxgpt.config import Config, load_config_file, parse_args
from jaxgpt.errors import UserError


def test_defaults_and_flags_are_typed():
    cfg = parse_args(["--batch_size=7", "--learning_rate=3e-4", "--bias=True", "--out_dir=x", "--dropout=0"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.bias, cfg.out_dir, cfg.dropout) == (7, 3e-4, True, "x", 0.0)
    assert isinstance(cfg.dropout, float)
    assert parse_args([]) == Config()


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.py"
    f.write_text('"""doc"""\n# comment\nbatch_size = 3 * 4\nout_dir = "o"\nlearning_rate = 1e-3\n')
    cfg = parse_args(["--config", str(f), "--out_dir=p"])
    assert (cfg.batch_size, cfg.out_dir, cfg.learning_rate) == (12, "p", 1e-3)
    assert parse_args([f"--config={f}"]).batch_size == 12
    assert parse_args([str(f)]).batch_size == 12  # nanoGPT's positional form


def test_shipped_configs_load():
    for name in ("shakespeare_char", "shakespeare_char_cpu", "bigram_shakespeare"):
        parse_args(["--config", f"configs/{name}.py"]).validate()
    cpu = parse_args(["--config", "configs/shakespeare_char_cpu.py"])
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size, cpu.batch_size, cpu.max_iters) == (4, 4, 128, 64, 12, 2000)


@pytest.mark.parametrize("argv, message", [
    (["--batch_sz=3"], "did you mean 'batch_size'"),
    (["--batch_size=abc"], "batch_size expects an integer"),
    (["--batch_size=1.5"], "batch_size expects an integer"),
    (["--bias=maybe"], "bias expects True or False"),
    (["--learning_rate=fast"], "learning_rate expects a number"),
    (["--config", "does/not/exist.py"], "config file not found"),
    (["--batch_size"], "--batch_size=VALUE"),
])
def test_config_errors(argv, message):
    with pytest.raises(UserError, match=message) as e:
        parse_args(argv)
    assert "valid keys" in str(e.value) or "unknown" not in str(e.value)


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "a.py"
    bad_key.write_text("n_layers = 4\n")
    with pytest.raises(UserError, match=r"a.py:1.*did you mean 'n_layer'.*valid keys"):
        load_config_file(str(bad_key))
    code = tmp_path / "b.py"
    code.write_text("import os\n")
    with pytest.raises(UserError, match="only contain 'name = value'"):
        load_config_file(str(code))
    call = tmp_path / "c.py"
    call.write_text("batch_size = int('3')\n")
    with pytest.raises(UserError, match="literals"):
        load_config_file(str(call))


def test_validate():
    with pytest.raises(UserError, match="divisible by n_head"):
        Config(n_embd=100, n_head=3).validate()
    with pytest.raises(UserError, match="model_type must be one of"):
        Config(model_type="rnn").validate()
    with pytest.raises(UserError, match="dtype"):
        Config(dtype="float16").validate()


def test_every_shipped_config_loads_and_validates():
    """Each configs/*.py parses (only known keys, right types) and passes validate(); running them is
    another test's."""
    import glob
    import os

    from conftest import ROOT

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert len(paths) >= 9
    for path in paths:
        cfg = parse_args(["--config", path]).validate()
        assert cfg.out_dir != Config().out_dir, path  # each names its own out_dir
    lora = parse_args(["--config", os.path.join(ROOT, "configs", "finetune_code_lora.py")])
    assert (lora.finetune_method, lora.lora_dropout, lora.dropout) == ("lora", 0.05, 0.0)
