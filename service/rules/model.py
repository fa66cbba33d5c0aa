"""Rules as data: a metric selector, a condition, for_steps, severity and a hint; YAML loading.

>>> rules = parse_rules([{"name": "qk", "metric": "attn.logit_max",
...     "condition": {"kind": "threshold", "op": ">", "value": 50}, "hint": "enable QK-norm"}])
>>> rules[0].condition.value
50.0
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CONDITION_KINDS",
    "Absent",
    "Condition",
    "Growth",
    "Jump",
    "NonFinite",
    "Precedent",
    "Rule",
    "RuleError",
    "ScheduleDeviation",
    "Slope",
    "Spike",
    "Threshold",
    "check_references",
    "load_rules_file",
    "parse_rules",
    "parse_rules_text",
    "rules_to_data",
]

Severity = Literal["info", "warning", "critical"]
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
_GLOB_RE = re.compile(r"^[a-z0-9_.*?\[\]]{1,128}$")


class RuleError(ValueError):
    """Invalid rules; ``errors`` lists ``{"field": "rules[0].condition.ratio", "message": ...}``."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        first = f"{errors[0]['field']}: {errors[0]['message']}" if errors else "invalid rules"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first + more)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(v: float, what: str = "value") -> float:
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number")
    return v


class Threshold(_Model):
    """Value (or |value|) compared with a fixed number, or with ``value`` × a run-config entry."""

    kind: Literal["threshold"]
    op: Literal[">", ">=", "<", "<="] = ">"
    value: float
    abs: bool = False
    #: When set, the threshold is ``value × config[of_config]`` (e.g. 0.9 × softcap_final);
    #: the rule is skipped for runs whose config lacks that entry.
    of_config: str | None = None

    @field_validator("value")
    @classmethod
    def _value(cls, v: float) -> float:
        return _finite(v)


class Growth(_Model):
    """|value| against a baseline: its minimum (``ratio`` > 1, a rise) or maximum (``ratio`` < 1,
    a drop) over the last ``over_steps`` steps.

    A rise fires at |value| ≥ ratio × max(baseline, ``min_value``): the floor keeps a doubling
    from near zero (early training) from counting. A drop fires at |value| ≤ ratio × baseline,
    and only from a baseline ≥ ``min_value``. Rules with ``skip_warmup`` take their baseline
    after warmup; on a run without warmup (none declared, none seen in its lr), ``settle``
    (the default) waits until the value has settled: the first point at least ``over_steps``
    after the series' first whose |value| is less than √ratio beyond the baseline (half-way to
    firing), which ends the fast change that follows initialisation.
    """

    kind: Literal["growth"]
    ratio: float = Field(gt=0)
    over_steps: int = Field(ge=1, le=100_000)
    #: The absolute floor: a rise counts from a baseline of at least this; a drop only from
    #: a baseline (window maximum) of at least this.
    min_value: float = Field(default=0.0, ge=0)
    #: Judge only once the value has settled (see above); false judges from the first point.
    settle: bool = True

    @field_validator("ratio")
    @classmethod
    def _not_one(cls, v: float) -> float:
        if not math.isfinite(v) or v == 1:
            raise ValueError("ratio must be a finite number other than 1 (>1 rise, <1 drop)")
        return v


class Spike(_Model):
    """A value above centre + sigmas·spread of a rolling window: ``mad`` uses median and
    1.4826·MAD, ``zscore`` a winsorised mean and standard deviation (both robust to heavy tails)."""

    kind: Literal["mad", "zscore"]
    window: int = Field(default=200, ge=5, le=2000)
    sigmas: float = Field(default=6.0, gt=0)
    min_points: int = Field(default=10, ge=3)
    #: The value must also exceed the centre by this fraction of |centre| (flat series guard).
    min_rel: float = Field(default=0.0, ge=0)
    direction: Literal["up", "down", "both"] = "up"

    @model_validator(mode="after")
    def _points(self) -> Spike:
        if self.min_points > self.window:
            raise ValueError("min_points must not exceed window")
        return self


class Slope(_Model):
    """Least-squares slope (per step) over the last ``window_steps`` steps above ``above``."""

    kind: Literal["slope"]
    above: float
    window_steps: int = Field(default=100, ge=2, le=100_000)
    min_points: int = Field(default=5, ge=2)
    #: Only once |value| is at least this (a steady rise from a low level is training).
    min_value: float = Field(default=0.0, ge=0)
    #: Fit the slope of |value| (log Z drifting away from 0 either way).
    abs: bool = False

    @field_validator("above")
    @classmethod
    def _above(cls, v: float) -> float:
        return _finite(v, "above")


class Jump(_Model):
    """Value ≥ ``ratio`` × the median of its last ``window`` points (e.g. a resume with the wrong LR)."""

    kind: Literal["jump"]
    ratio: float = Field(default=5.0, gt=1)
    window: int = Field(default=20, ge=3, le=2000)
    min_points: int = Field(default=5, ge=1)


class NonFinite(_Model):
    """NaN or ±Inf."""

    kind: Literal["nonfinite"]


class Absent(_Model):
    """No point of the selected metrics for ``seconds`` (checked periodically, not per batch)."""

    kind: Literal["absent"]
    seconds: float = Field(gt=0)


class ScheduleDeviation(_Model):
    """LR more than ``tolerance`` (relative) away from the run's declared schedule
    (``config.schedule``, see logitwatch.schedules); one step of slack either way."""

    kind: Literal["schedule"]
    tolerance: float = Field(default=0.1, gt=0)


Condition = Annotated[
    Threshold | Growth | Spike | Slope | Jump | NonFinite | Absent | ScheduleDeviation,
    Field(discriminator="kind"),
]
CONDITION_KINDS = (
    "threshold",
    "growth",
    "mad",
    "zscore",
    "slope",
    "jump",
    "nonfinite",
    "absent",
    "schedule",
)


class Precedent(_Model):
    """Only fire when rule ``rule`` triggered on this run within the ``within_steps`` before."""

    rule: str
    within_steps: int = Field(default=50, ge=1)


class Rule(_Model):
    """One rule. Label matchers: an exact value, ``"*"`` (present, any value) or ``""`` (absent)."""

    name: str
    metric: str | list[str]
    labels: dict[str, str] = Field(default_factory=dict)
    condition: Condition
    for_steps: int = Field(default=1, ge=1, le=100_000)
    severity: Severity = "warning"
    hint: str = Field(default="", max_length=1000)
    description: str = Field(default="", max_length=2000)
    enabled: bool = True
    #: Ignore points before the end of the run's warmup: declared (``schedule.warmup_steps``,
    #: ``warmup_steps``) or else inferred from its ``lr`` series (see warmup.py).
    skip_warmup: bool = False
    min_step: int = Field(default=0, ge=0)
    #: Steps after each scheduled SGDR restart during which the rule is muted (and its window reset).
    mute_after_restart: int = Field(default=0, ge=0)
    preceded_by: Precedent | None = None
    #: A firing alert resolves only once its condition has been clear for this many steps; a
    #: condition that holds again within them continues the same alert (one alert an episode).
    hold_steps: int = Field(default=0, ge=0, le=100_000)
    #: A firing alert's condition clears only once the value is this fraction of |threshold|
    #: on the safe side of the threshold (between the two, it keeps firing).
    resolve_margin: float = Field(default=0.0, ge=0, lt=1)
    #: Where the default comes from (built-in rules name their paper).
    source: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("rule names are 1-64 characters of [a-z0-9_.-], starting alphanumeric")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | list[str]) -> str | list[str]:
        for m in [v] if isinstance(v, str) else v:
            if not _GLOB_RE.match(m):
                raise ValueError(f"{m!r} is not a metric name or glob like 'logits.*'")
        if not isinstance(v, str) and not v:
            raise ValueError("give at least one metric")
        return v

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    def matches(self, metric: str, labels: dict[str, str]) -> bool:
        if not any(fnmatch.fnmatchcase(metric, m) for m in self.metrics):
            return False
        for key, want in self.labels.items():
            have = labels.get(key)
            if want == "":
                if have is not None:
                    return False
            elif have is None or (want != "*" and have != want):
                return False
        return True


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    prev = None
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif prev == "condition" and p in CONDITION_KINDS:
            pass  # pydantic names the union member; the user wrote only 'condition'
        else:
            out += f".{p}" if out else str(p)
        prev = p
    return out


def parse_rules(data: Any) -> list[Rule]:
    """Validate a list of rule dicts (or ``{"rules": [...]}``); raises RuleError naming fields."""
    if isinstance(data, dict) and set(data) <= {"rules"}:
        data = data.get("rules") or []
    if data is None:
        return []
    if not isinstance(data, list):
        raise RuleError([{"field": "rules", "message": "must be a list of rules"}])
    rules: list[Rule] = []
    errors: list[dict[str, str]] = []
    for i, item in enumerate(data):
        try:
            rules.append(Rule.model_validate(item))
        except ValidationError as exc:
            for e in exc.errors():
                msg = e["msg"].removeprefix("Value error, ")
                errors.append({"field": _loc(("rules", i, *e["loc"])), "message": msg})
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        if r.name in seen:
            errors.append(
                {"field": f"rules[{i}].name", "message": f"duplicate rule name {r.name!r}"}
            )
        seen[r.name] = i
    if errors:
        raise RuleError(errors)
    return rules


def parse_rules_text(text: str) -> list[Rule]:
    """Rules from YAML (JSON is YAML too)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        msg = f"not valid YAML: {getattr(exc, 'problem', exc)}"
        raise RuleError([{"field": where, "message": msg}]) from None
    return parse_rules(data)


def load_rules_file(path: str | Path) -> list[Rule]:
    """Rules from a YAML file; the error names the file and the field, in one line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"--rules {path}: {exc.strerror or exc}") from None
    try:
        return parse_rules_text(text)
    except RuleError as exc:
        raise ValueError(f"--rules {path}: {exc}") from None


def rules_to_data(rules: list[Rule]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json", exclude_defaults=True) | {"name": r.name} for r in rules]


def check_references(user: list[Rule], builtin: list[Rule]) -> None:
    """``preceded_by`` must name a rule that exists (built-in or user)."""
    names = {r.name for r in builtin} | {r.name for r in user}
    errors = [
        {
            "field": f"rules[{i}].preceded_by.rule",
            "message": f"no rule named {r.preceded_by.rule!r}",
        }
        for i, r in enumerate(user)
        if r.preceded_by is not None and r.preceded_by.rule not in names
    ]
    if errors:
        raise RuleError(errors)
