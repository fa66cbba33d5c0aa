"""The hyperparameter lint: rules, severities, config files and the `logitwatch lint` command."""

import json

import pytest

from logitwatch.agent import DecoderConfig, get_preset
from logitwatch.agent.reference.lint import SEVERITIES, TrainSettings, lint, load_lint_config
from logitwatch.cli import main

GOOD_TRAIN = TrainSettings(warmup=2000, weight_decay=0.1)
SHAPE_RULES = {"ffn_ratio", "head_ratio", "aspect"}


def _rules(config, train=GOOD_TRAIN) -> dict[str, str]:
    return {f.rule: f.severity for f in lint(config, train)}


def _good(**overrides) -> DecoderConfig:
    """A config the lint has nothing to say about: LLaMA-like, 128 wide per layer, guarded."""
    base = dict(n_layers=4, d_model=512, n_heads=8, ffn="swiglu", qk_norm=True, z_loss=1e-4)
    return DecoderConfig(**{**base, **overrides})


def test_t5_full_reports_head_ratio_16_and_ffn_ratio_64():
    findings = {f.rule: f for f in lint(get_preset("t5", full=True), GOOD_TRAIN)}
    assert "64.00" in findings["ffn_ratio"].message and findings["ffn_ratio"].severity == "warning"
    assert "16.00" in findings["head_ratio"].message
    assert findings["head_ratio"].severity == "warning"


def test_gpt3_full_has_no_shape_finding():
    assert not SHAPE_RULES & set(_rules(get_preset("gpt3", full=True)))


def test_every_finding_has_severity_reason_and_source():
    findings = lint(get_preset("t5", full=True), TrainSettings(warmup=0, weight_decay=0.0))
    assert {f.rule for f in findings} == SHAPE_RULES | {"warmup", "weight_decay", "softmax"}
    for f in findings:
        assert f.severity in SEVERITIES and f.reason and f.source and f.message


def test_clean_config_has_no_finding():
    assert lint(_good(), GOOD_TRAIN) == []


@pytest.mark.parametrize(
    "overrides, severity",
    [
        ({"ffn": "relu"}, None),  # 4x: on target
        ({"ffn": "relu", "d_ff": 1365}, "info"),  # GLU's 8/3 with a plain FFN
        ({"ffn": "swiglu", "d_ff": 1792}, "info"),  # LLaMA 2's 3.5
        ({"ffn": "geglu", "d_ff": 4096}, "warning"),  # LaMDA's 8
        ({"ffn": "swiglu", "d_ff": 1280}, None),  # T5 v1.1's 2.5: within 10 %
    ],
)
def test_ffn_ratio_targets_4_or_8_thirds_for_glu(overrides, severity):
    assert _rules(_good(**overrides)).get("ffn_ratio") == severity


@pytest.mark.parametrize(
    "head_dim, n_layers, rule, severity",
    [
        (128, 4, "head_ratio", "info"),  # ratio 2, like LaMDA
        (256, 4, "head_ratio", "warning"),  # ratio 4
        (64, 2, "aspect", "info"),  # 256 per layer
        (64, 32, "aspect", "warning"),  # 16 per layer
    ],
)
def test_head_ratio_and_aspect(head_dim, n_layers, rule, severity):
    assert _rules(_good(head_dim=head_dim, n_layers=n_layers)) == {rule: severity}


@pytest.mark.parametrize(
    "train, expected",
    [
        (TrainSettings(), {"warmup": "info", "weight_decay": "info"}),
        (
            TrainSettings(warmup=0, weight_decay=0.0),
            {"warmup": "warning", "weight_decay": "warning"},
        ),
        (TrainSettings(warmup=10, weight_decay=0.01), {}),
    ],
)
def test_warmup_and_weight_decay(train, expected):
    assert _rules(_good(), train) == expected


@pytest.mark.parametrize(
    "guards, severity",
    [
        ({"qk_norm": False, "z_loss": 0.0}, "warning"),
        ({"qk_norm": False, "z_loss": 1e-4}, "info"),  # attention side open
        ({"qk_norm": False, "z_loss": 0.0, "softcap_attn": 50.0}, "info"),  # output side open
        ({"qk_norm": False, "z_loss": 0.0, "softcap_attn": 50.0, "softcap_final": 30.0}, None),
    ],
)
def test_softmax_guards(guards, severity):
    assert _rules(_good(**guards)).get("softmax") == severity


def test_bad_train_settings_name_the_field():
    with pytest.raises(ValueError, match="warmup"):
        TrainSettings(warmup=-1)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainSettings(weight_decay=float("inf"))


def test_toml_config_with_model_and_train_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "llama2"\nd_model = 512\nn_layers = 4\n\n'
        "[model]\nqk_norm = true\nz_loss = 1e-4\nn_heads = 8\nhead_dim = 64\nd_ff = 1408\n"
        "n_kv_heads = 2\n\n[train]\nwarmup = 100\nweight_decay = 0.1\n"
    )
    config, train, label = load_lint_config(path)
    assert (config.d_model, config.qk_norm, config.ffn, config.n_kv_heads) == (
        512,
        True,
        "swiglu",
        2,
    )
    assert train == TrainSettings(warmup=100, weight_decay=0.1)
    assert "llama2" in label
    assert lint(config, train) == []


def test_json_config_bare_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"d_model": 64, "n_heads": 4, "warmup": 0, "ffn": "gelu"}))
    config, train, _ = load_lint_config(path)
    assert config.d_ff == 256 and train.warmup == 0 and train.weight_decay is None


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["lint", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_exit_status_only_strict_with_warning(capsys, tmp_path):
    rc, out, _ = _cli(capsys, "--preset", "t5", "--full")
    assert rc == 0 and "head_ratio" in out and "16.00" in out and "64.00" in out
    assert _cli(capsys, "--preset", "t5", "--full", "--strict")[0] == 1
    path = tmp_path / "good.toml"
    path.write_text(
        "d_model = 512\nn_layers = 4\nn_heads = 8\nqk_norm = true\nz_loss = 1e-4\n"
        "[train]\nwarmup = 10\n"
    )
    rc, out, _ = _cli(capsys, "--config", str(path), "--weight-decay", "0.1", "--strict")
    assert rc == 0 and "0 finding(s)" in out
    rc, out, _ = _cli(capsys, "--config", str(path), "--weight-decay", "0", "--strict")
    assert rc == 1 and "weight decay is off" in out


def test_cli_json(capsys):
    rc, out, _ = _cli(capsys, "--preset", "gpt3", "--full", "--json", "--warmup", "375")
    rules = {f["rule"]: f for f in json.loads(out)}
    assert rc == 0 and set(rules) == {"weight_decay", "softmax"}
    assert set(rules["softmax"]) == {"rule", "severity", "message", "reason", "source"}


@pytest.mark.parametrize(
    "argv_or_file, words",
    [
        (["--preset", "gpt4"], ["gpt4", "llama2"]),
        (["--preset", "gpt3", "--warmup", "-5"], ["warmup"]),
        ("d_modle = 3\n", ["d_modle", "d_model"]),
        ("[model]\nn_head = 3\n", ["n_head", "n_heads"]),
        ("[train]\nwarmpu = 3\n", ["train.warmpu"]),
        ("dropout_attn = -0.5\n", ["dropout_attn"]),
        ("head_dim = 7\n", ["head_dim", "RoPE"]),
        ("softcap_final = 0\n", ["softcap_final"]),
        ('preset = "palm"\nfull = "yes"\n', ["full"]),
        ("d_model = [", ["not valid TOML"]),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_field(capsys, tmp_path, argv_or_file, words):
    if isinstance(argv_or_file, list):
        argv = argv_or_file
    else:
        path = tmp_path / "bad.toml"
        path.write_text(argv_or_file)
        argv = ["--config", str(path)]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("logitwatch: error:") and err.strip().count("\n") == 0
    assert all(w in err for w in words), err


def test_cli_missing_file(capsys, tmp_path):
    rc, _, err = _cli(capsys, "--config", str(tmp_path / "nope.toml"))
    assert rc == 2 and "nope.toml" in err
