"""User rules: YAML/JSON parsing, errors that name the field, selectors, built-ins valid."""

from __future__ import annotations

import subprocess
import sys

import pytest

from logitwatch.service.rules.builtin import builtin_rules
from logitwatch.service.rules.model import (
    RuleError,
    load_rules_file,
    parse_rules,
    parse_rules_text,
    rules_to_data,
)
from logitwatch.service.rules.user import effective_rules

GOOD = """
rules:
  - name: qk-early
    metric: attn.logit_max
    labels: {layer: "0"}
    condition: {kind: growth, ratio: 3, over_steps: 20}
    for_steps: 2
    severity: critical
    hint: enable QK-norm
  - name: loss-flat
    metric: loss
    condition: {kind: slope, above: 0.0, window_steps: 50}
"""


def test_yaml_rules_parse_with_defaults():
    rules = parse_rules_text(GOOD)
    assert [r.name for r in rules] == ["qk-early", "loss-flat"]
    assert rules[0].condition.ratio == 3 and rules[0].for_steps == 2
    assert rules[1].severity == "warning" and rules[1].for_steps == 1


@pytest.mark.parametrize(
    ("rule", "field", "words"),
    [
        ({"metric": "loss", "condition": {"kind": "nonfinite"}}, "rules[0].name", "required"),
        (
            {
                "name": "a",
                "metric": "loss",
                "condition": {"kind": "growth", "ratio": 1, "over_steps": 5},
            },
            "rules[0].condition.ratio",
            "other than 1",
        ),
        (
            {"name": "a", "metric": "loss", "condition": {"kind": "bogus"}},
            "rules[0].condition",
            "bogus",
        ),
        (
            {
                "name": "a",
                "metric": "loss",
                "condition": {"kind": "threshold", "value": 1},
                "severity": "loud",
            },
            "rules[0].severity",
            "warning",
        ),
        (
            {"name": "a", "metric": "Loss!", "condition": {"kind": "nonfinite"}},
            "rules[0].metric",
            "metric name",
        ),
        (
            {
                "name": "a",
                "metric": "loss",
                "condition": {"kind": "mad", "window": 10, "min_points": 20},
            },
            "rules[0].condition",
            "min_points",
        ),
        (
            {"name": "a", "metric": "loss", "condition": {"kind": "nonfinite"}, "extra": 1},
            "rules[0].extra",
            "not permitted",
        ),
        (
            {"name": "a", "metric": "x", "condition": {"kind": "nonfinite"}, "hold_steps": -1},
            "rules[0].hold_steps",
            "greater than or equal to 0",
        ),
        (
            {"name": "a", "metric": "x", "condition": {"kind": "nonfinite"}, "resolve_margin": 1},
            "rules[0].resolve_margin",
            "less than 1",
        ),
        (
            {
                "name": "a",
                "metric": "x",
                "condition": {"kind": "growth", "ratio": 2, "over_steps": 5, "min_value": -1},
            },
            "rules[0].condition.min_value",
            "greater than or equal to 0",
        ),
        (
            {
                "name": "a",
                "metric": "x",
                "condition": {"kind": "growth", "ratio": 2, "over_steps": 5, "settle": "maybe"},
            },
            "rules[0].condition.settle",
            "boolean",
        ),
    ],
)
def test_invalid_rules_name_the_field(rule, field, words):
    with pytest.raises(RuleError) as info:
        parse_rules([rule])
    assert info.value.errors[0]["field"] == field
    assert words in info.value.errors[0]["message"]


def test_duplicate_names_and_bad_yaml():
    r = {"name": "a", "metric": "loss", "condition": {"kind": "nonfinite"}}
    with pytest.raises(RuleError, match=r"rules\[1\].name: duplicate"):
        parse_rules([r, r])
    with pytest.raises(RuleError, match="line 2: not valid YAML"):
        parse_rules_text("rules:\n  - name: [")


def test_label_matchers():
    (r,) = parse_rules(
        [{"name": "g", "metric": ["grad.*", "loss"], "labels": {"layer": "", "group": "*"},
          "condition": {"kind": "nonfinite"}}]
    )  # fmt: skip
    assert r.matches("grad.norm", {"group": "0"})
    assert not r.matches("grad.norm", {"group": "0", "layer": "1"})  # "" means absent
    assert not r.matches("grad.norm", {})  # "*" means present
    assert not r.matches("lr", {"group": "0"})


def test_builtins_are_valid_and_overridable():
    builtin = builtin_rules()
    names = {r.name for r in builtin}
    assert {
        "nonfinite",
        "attn-logit-high",
        "attn-logit-critical",
        "loss-spike",
        "run-silent",
    } <= names
    assert all(r.source and r.hint for r in builtin)
    user = parse_rules(
        [
            {"name": "loss-spike", "metric": "loss", "condition": {"kind": "nonfinite"}, "enabled": False},
            {"name": "attn-logit-high", "metric": "attn.logit_max",
             "condition": {"kind": "threshold", "value": 50}},
        ]
    )  # fmt: skip
    eff = {r.name: r for r in effective_rules(builtin, user)}
    assert "loss-spike" not in eff and eff["attn-logit-high"].condition.value == 50


def test_rules_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: x\n  metric: loss\n  condition: {kind: growth, ratio: 2}\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml: rules\[0\].condition.over_steps: Field required"
    ):
        load_rules_file(bad)
    with pytest.raises(ValueError, match="No such file"):
        load_rules_file(tmp_path / "missing.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "logitwatch", "serve", "--db", f"sqlite:///{tmp_path}/x.db",
         "--rules", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "over_steps" in out.stderr


def test_hysteresis_knobs_and_their_defaults():
    (r,) = parse_rules([{"name": "a", "metric": "x", "condition": {"kind": "growth", "ratio": 2,
                         "over_steps": 50, "min_value": 20}, "hold_steps": 50,
                         "resolve_margin": 0.1}])  # fmt: skip
    assert (r.hold_steps, r.resolve_margin, r.condition.settle) == (50, 0.1, True)
    (plain,) = parse_rules([{"name": "b", "metric": "x", "condition": {"kind": "nonfinite"}}])
    assert (plain.hold_steps, plain.resolve_margin) == (0, 0.0)  # user rules: no hysteresis
    assert "hold_steps" not in rules_to_data([plain])[0]


def test_every_builtin_attention_max_rule_compares_the_magnitude():
    rules = [r for r in builtin_rules() if r.matches("attn.logit_max", {"layer": "0", "head": "0"})]
    assert {r.name for r in rules} >= {
        "attn-logit-high",
        "attn-logit-critical",
        "attn-logit-growth",
    }
    for r in rules:
        c = r.condition
        if c.kind in ("absent", "nonfinite"):
            continue  # no value compared
        assert c.kind == "growth" or getattr(c, "abs", False), r.name  # growth always uses |x|
