import pytest

from nanoforge.config import PRESETS, PretrainConfig, build, model_config, parse_sets, resolve_pretrain
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT


@pytest.mark.parametrize("name,vocab,lo,hi", [
    ("cpu-tiny", 4096, 1e6, 3e6), ("cpu-small", 8192, 10e6, 20e6),
    ("gpt2-124m", 50257, 120e6, 130e6), ("llama-1b", 128256, 1.1e9, 1.3e9),
])
def test_presets_have_their_advertised_sizes(name, vocab, lo, hi):
    import torch

    cfg = resolve_pretrain(PretrainConfig(preset=name))
    with torch.device("meta"):
        n = GPT(model_config(cfg, vocab)).num_params()
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M parameters"


def test_gpt2_preset_is_gpt2_small():
    m = model_config(resolve_pretrain(PretrainConfig(preset="gpt2-124m")), 50257)
    assert (m.flavour, m.n_layer, m.n_embd, m.n_head, m.seq_len, m.vocab_size) == ("gpt2", 12, 768, 12, 1024, 50304)


def test_depth_dial_rescales_width_and_lr():
    base = resolve_pretrain(PretrainConfig(preset="cpu-tiny"))
    deeper = resolve_pretrain(PretrainConfig(preset="cpu-tiny", depth=8))
    assert deeper.depth * deeper.aspect == 2 * base.depth * base.aspect
    assert deeper.lr == pytest.approx(base.lr / 2)
    # an explicit lr wins over the derivation
    assert resolve_pretrain(PretrainConfig(preset="cpu-tiny", depth=8, lr=1e-3)).lr == 1e-3


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(NanoforgeError, match="unknown preset 'nope'"):
        resolve_pretrain(PretrainConfig(preset="nope"))


def test_build_coerces_strings_and_refuses_unknown_keys():
    cfg = build(PretrainConfig, parse_sets(["lr=0.01", "max_steps=5", "compile=true", "depth=none"]), "t")
    assert (cfg.lr, cfg.max_steps, cfg.compile, cfg.depth) == (0.01, 5, True, None)
    with pytest.raises(NanoforgeError, match="unknown setting"):
        build(PretrainConfig, {"learning_rate": 1}, "t")
    with pytest.raises(NanoforgeError, match="expected a number"):
        build(PretrainConfig, {"lr": "fast"}, "t")


def test_every_preset_resolves():
    for name in PRESETS:
        cfg = resolve_pretrain(PretrainConfig(preset=name))
        assert cfg.batch_tokens % (cfg.batch_size * cfg.seq_len) == 0


def test_compile_mode_is_checked_and_reaches_torch_compile(monkeypatch):
    """`--set compile_mode=…` is one of torch.compile's modes (a clear error otherwise) and is what the
    training model is compiled with."""
    import torch

    from nanoforge.model import GPT, ModelConfig
    from nanoforge.train.distributed import Dist, parallelize

    with pytest.raises(NanoforgeError, match="compile_mode must be one of default, reduce-overhead"):
        resolve_pretrain(PretrainConfig(preset="cpu-tiny", compile_mode="fastest"))
    assert resolve_pretrain(PretrainConfig(preset="cpu-tiny", compile_mode="reduce-overhead")).compile_mode == \
        "reduce-overhead"
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or module)
    model = GPT(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_embd=16, n_head=2))
    parallelize(model, Dist(), torch.device("cpu"), parallel="ddp", bf16=False, compile=True,
                compile_mode="max-autotune-no-cudagraphs")
    assert modes == ["max-autotune-no-cudagraphs"]
    with pytest.raises(NanoforgeError, match="records CUDA graphs, which FSDP"):
        parallelize(model, Dist(rank=0, world_size=2), torch.device("cpu"), parallel="fsdp", bf16=False,
                    compile=True, compile_mode="reduce-overhead")


def test_toml_values_are_checked_against_the_type_hints(tmp_path):
    """A value of the wrong type is one line naming the setting, not a traceback later on (or a silent 2)."""
    from nanoforge.pipeline import load_pipeline_config

    config = tmp_path / "run.toml"
    for text, match in (("[pretrain]\nmax_steps = 2.5\n", r"\[pretrain\]: max_steps: expected an integer, got 2.5"),
                        ("[run]\nname = [5]\n", "name: expected a string, got \\[5\\]"),
                        ("[crawl]\nsitemaps = 3\n", "sitemaps: expected true/false, got 3"),
                        ('[label]\ntemperatures = [1.0, "hot"]\n', "temperatures: expected a number, got 'hot'"),
                        ("[grpo]\nreward_weights = 1\n", "reward_weights: expected a table"),
                        ("run = 5\n", "run must be a \\[table\\]")):
        config.write_text(text)
        with pytest.raises(NanoforgeError, match=match):
            load_pipeline_config(config)
    config.write_text("[run]\nname = 5\n[pretrain]\nmax_time = 3600\nbatch_tokens = 5e5\n")
    p = load_pipeline_config(config)  # a number where text is expected is its text; a whole float is an integer
    assert (p.run.name, p.pretrain.max_time, p.pretrain.batch_tokens) == ("5", "3600", 500000)


def test_set_fills_table_settings_from_key_value_pairs_and_dotted_keys():
    from nanoforge.pipeline import load_pipeline_config
    from nanoforge.post.tasks import get_task

    p = load_pipeline_config(None, parse_sets([
        "grpo.task_options=digits=3", "grpo.reward_weights=correct=1,format=0", "label.temperatures=0.7,1.0",
        "clean.options.language.threshold=0.5", "clean.options.pii.emails=false"]))
    assert p.grpo.task_options == {"digits": 3} and get_task(p.grpo.task, **p.grpo.task_options).digits == 3
    assert p.grpo.reward_weights == {"correct": 1.0, "format": 0.0} and p.label.temperatures == [0.7, 1.0]
    assert p.clean.options == {"language": {"threshold": 0.5}, "pii": {"emails": False}}  # over demo.toml's 0.4
    # a dotted key changes one entry of the table and keeps the others
    assert load_pipeline_config(None, parse_sets(["grpo.reward_weights.format=0.5"])).grpo.reward_weights == {
        "correct": 1.0, "format": 0.5}
    with pytest.raises(NanoforgeError, match="expected KEY=VALUE pairs"):
        load_pipeline_config(None, parse_sets(["grpo.task_options=3"]))
    with pytest.raises(NanoforgeError, match="lr: expected a number"):
        load_pipeline_config(None, parse_sets(["pretrain.lr.x=1"]))


@pytest.mark.parametrize(("setting", "message"), [
    ("eval.tasks=arithmetic,bogus", "unknown task"), ("eval.pass_k=0", "must be positive"),
    ("pretrain.ckpt_every=0", "ckpt_every >= 1"), ("grpo.scale_rewards=sometimes", "scale_rewards")])
def test_a_run_config_is_checked_whole_before_any_stage_runs(setting, message):
    """A mistake in a late stage's settings is an error when the config is read, not after the early
    stages have trained for minutes."""
    from nanoforge.pipeline import load_pipeline_config

    with pytest.raises(NanoforgeError, match=message):
        load_pipeline_config(None, parse_sets([setting]))
