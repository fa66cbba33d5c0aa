"""torch.distributed (DDP, 2 gloo ranks): rank 0 reports for all, or every rank with per_rank;
rank 0's alerts act on every rank at the same step; a probe failing on one rank hangs nobody."""

import json
import math

import pytest
import torch
from helpers.ranks import spawn_ranks

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.monitoring.actions import Checkpoint, LowerLR, StopTraining
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink

V, T, B = 128, 16, 2


def _ddp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # same weights on both ranks
    model = torch.nn.parallel.DistributedDataParallel(
        Decoder(DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=T))
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train_step(model, opt, rank: int, step: int) -> torch.Tensor:
    torch.manual_seed(100 * step + rank)  # different data on each rank
    idx = torch.randint(0, V, (B, T))
    ce, _ = loss_fn(model(idx), idx, z_loss=0.0)
    ce.backward()
    opt.step()
    opt.zero_grad()
    return ce


def _rows(sink: MemorySink) -> list:
    return [[s, [[k[0], dict(k[1]), v] for k, v in vals.items()]] for s, _, vals in sink.rows]


def _reporting(rank: int) -> dict:
    out = {}
    for per_rank in (False, True):
        model, opt = _ddp()
        sink = MemorySink()
        config = MonitorConfig(per_rank=per_rank, param_every=1)
        monitor = Monitor(model, opt, run="ddp", sink=sink, config=config)
        for step in range(2):
            ce = _train_step(model, opt, rank, step)
            monitor.step(step, loss=ce, tokens=B * T)
        hooked = sum(len(m._forward_hooks) for m in model.modules())
        monitor.close()
        out[str(per_rank)] = {"hooked": hooked, "rows": _rows(sink)}
    return out


def _broadcast(rank: int, defer: bool) -> dict:
    """Rank 0 alone receives a critical alert after step 1; every rank lowers its LR, saves
    and stops at the same step (the next reporting step; one later with deferred reads)."""
    model, opt = _ddp()
    monitor = Monitor(model, opt, run="b", sink=MemorySink(), config=MonitorConfig(every=2))
    monitor.ranks.defer = defer  # as on an accelerator: decisions read a report later
    saves, lrs, stop = [], [], None
    step = 0
    monitor.on_alert(LowerLR(opt, 0.5))
    monitor.on_alert(Checkpoint(lambda alert: saves.append([step, alert["rule"], alert["source"]])))
    monitor.on_alert(StopTraining())
    for step in range(10):  # the checkpoint closure reads it
        ce = _train_step(model, opt, rank, step)
        monitor.step(step, loss=ce)
        lrs.append(opt.param_groups[0]["lr"])
        if step == 1 and rank == 0:  # as the worker thread would, from the service's answer
            alert = {"id": 7, "rule": "attn-logit-critical", "severity": "critical",
                     "first_step": 1, "source": "service"}  # fmt: skip
            monitor.alerts.notify(alert)
        if monitor.should_stop:
            stop = step
            break
    monitor.close()
    return {"stop": stop, "lrs": lrs, "saves": saves, "collectives": monitor.ranks.collectives}


def _failing(rank: int) -> dict:
    """Rank 1's attention probe fails before its first report, its param probe at step 2."""
    model, opt = _ddp()
    sink = MemorySink()
    monitor = Monitor(model, opt, run="f", sink=sink, config=MonitorConfig(every=1, param_every=1))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    if rank == 1:
        monitor._probes._attn = boom
    for step in range(4):
        if rank == 1 and step == 2:
            monitor.params.weights = boom
        ce = _train_step(model, opt, rank, step)
        monitor.step(step, loss=ce)
    monitor.close()
    return {"rows": _rows(sink), "collectives": monitor.ranks.collectives}


def _cadence(rank: int) -> dict:
    """Reporting every step, the weights every third: the same steps on both ranks, and the
    update ratio of those steps' own optimizer step, summed over both ranks' shares."""
    model, opt = _ddp()
    sink = MemorySink()
    monitor = Monitor(model, opt, run="c", sink=sink, config=MonitorConfig(every=1, param_every=3))
    ratios = []
    for step in range(7):
        before = [p.detach().clone() for p in model.parameters()]
        ce = _train_step(model, opt, rank, step)
        pairs = [(p.detach() - b, b) for p, b in zip(model.parameters(), before, strict=True)]
        d = math.sqrt(sum(float(x.pow(2).sum()) for x, _ in pairs))
        ratios.append(d / math.sqrt(sum(float(b.pow(2).sum()) for _, b in pairs)))
        monitor.step(step, loss=ce)
    monitor.close()
    return {"rows": _rows(sink), "ratios": ratios, "collectives": monitor.ranks.collectives}


def _nonfinite(rank: int) -> dict:
    """A NaN loss on rank 1 alone reaches rank 0's local guard; both ranks stop together."""
    model, opt = _ddp()
    monitor = Monitor(model, opt, run="n", sink=MemorySink(), config=MonitorConfig(every=1))
    monitor.on_alert(StopTraining())
    stop = None
    for step in range(40):
        ce = _train_step(model, opt, rank, step)
        loss = torch.tensor(float("nan")) if rank == 1 and step == 1 else ce.detach()
        monitor.step(step, loss=loss)
        monitor.flush(5)  # the guard sees the step on rank 0's worker thread
        if monitor.should_stop:
            stop = step
            break
    monitor.close()
    return {"stop": stop}


def _tight(rank: int) -> dict:
    """Rows too short for the first report: it is dropped, and every rank grows them."""
    model, opt = _ddp()
    sink = MemorySink()
    monitor = Monitor(model, opt, run="t", sink=sink, config=MonitorConfig(every=1))
    monitor.ranks.capacity = 8  # as if the model were far larger than its structure said
    capacities = []
    for step in range(3):
        monitor.step(step, loss=_train_step(model, opt, rank, step))
        capacities.append(monitor.ranks.capacity)
    monitor.close()
    return {"steps": [s for s, _, _ in sink.rows], "capacities": capacities,
            "dropped": monitor.ranks.dropped, "used": monitor.slots.used}  # fmt: skip


def _worker(rank: int, world: int, tmp: str) -> None:
    out = {
        "reporting": _reporting(rank),
        "tight": _tight(rank),
        "broadcast": _broadcast(rank, defer=False),
        "deferred": _broadcast(rank, defer=True),
        "failing": _failing(rank),
        "cadence": _cadence(rank),
        "nonfinite": _nonfinite(rank),
    }
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, str(tmp))
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def _value(rows, step, metric, **labels):
    labels = {k: str(v) for k, v in labels.items()}
    (value,) = [
        v for s, vals in rows if s == step for m, lab, v in vals if m == metric and lab == labels
    ]
    return value


def test_rank0_reports_by_default_and_per_rank_labels_every_rank(ranks):
    r0, r1 = (r["reporting"] for r in ranks)
    # Default: rank 0 alone reports, without a rank label; rank 1 probes and sends it its values.
    assert [s for s, _ in r0["False"]["rows"]] == [0, 1] and r0["False"]["hooked"] > 0
    assert r1["False"]["rows"] == [] and r1["False"]["hooked"] == r0["False"]["hooked"]
    assert all("rank" not in lab for _, vals in r0["False"]["rows"] for _, lab, _ in vals)
    # per_rank: both report, each labelled with its rank.
    for rank, res in ((0, r0), (1, r1)):
        rows = res["True"]["rows"]
        assert [s for s, _ in rows] == [0, 1]
        assert all(lab.get("rank") in (str(rank), None) for _, vals in rows for _, lab, _ in vals)
    # Gradients are all-reduced by DDP (equal); activations see each rank's own data (differ).
    g0 = _value(r0["True"]["rows"], 1, "grad.norm", rank=0)
    g1 = _value(r1["True"]["rows"], 1, "grad.norm", rank=1)
    assert abs(g0 - g1) <= 1e-5 * abs(g0)
    a0 = _value(r0["True"]["rows"], 1, "act.rms", layer=1, rank=0)
    a1 = _value(r1["True"]["rows"], 1, "act.rms", layer=1, rank=1)
    assert a0 != a1
    # By default rank 0's act.rms is the RMS over both ranks' data, its logit max the larger one.
    # (The default run trained the same weights on the same data as the per_rank one.)
    both = _value(r0["False"]["rows"], 1, "act.rms", layer=1)
    assert both == pytest.approx(math.sqrt((a0**2 + a1**2) / 2), rel=1e-5)
    m0, m1, m = (
        _value(rows, 1, "logits.max_abs", **lab)
        for rows, lab in (
            (r0["True"]["rows"], {"rank": 0}),
            (r1["True"]["rows"], {"rank": 1}),
            (r0["False"]["rows"], {}),
        )
    )
    assert m == max(m0, m1)


@pytest.mark.parametrize("mode, at", [("broadcast", 2), ("deferred", 4)])
def test_rank0s_alert_acts_on_every_rank_at_the_same_step(ranks, mode, at):
    r0, r1 = (r[mode] for r in ranks)
    assert r0["stop"] == r1["stop"] == at
    assert r0["lrs"] == r1["lrs"] == [1e-3] * at + [5e-4]  # the LR equal on both, every step
    assert r0["saves"] == [[at, "attn-logit-critical", "service"]]
    assert r1["saves"] == [[at, "attn-logit-critical", "rank 0"]]  # what rank 1 is told
    assert r0["collectives"] == r1["collectives"] == at // 2 + 1


def test_a_probe_failing_on_one_rank_goes_off_everywhere_and_hangs_nobody(ranks):
    r0, r1 = (r["failing"] for r in ranks)
    assert r0["collectives"] == r1["collectives"] == 4
    rows = {s: {m for m, _, _ in vals} for s, vals in r0["rows"]}
    # Step 0: the ranks' layouts differ (rank 1 never laid out attention): dropped, laid out
    # afresh. Step 2: rank 1 lacks its share of the weight norms: those are left out.
    assert sorted(rows) == [1, 2, 3]
    assert not any(m.startswith("attn.") for ms in rows.values() for m in ms)
    assert {"param.norm", "update.ratio", "grad.norm", "act.rms"} <= rows[1]
    assert "grad.norm" in rows[2] and "param.norm" not in rows[2] | rows[3]
    assert r1["rows"] == []


def test_weights_read_every_param_every_steps_on_every_rank(ranks):
    r0, r1 = (r["cadence"] for r in ranks)
    assert r0["collectives"] == r1["collectives"] == 7  # one a reporting step, as ever
    rows = {s: {m for m, _, _ in vals} for s, vals in r0["rows"]}
    assert sorted(rows) == list(range(7)) and r1["rows"] == []
    assert [s for s in rows if "param.norm" in rows[s]] == [0, 3, 6]
    assert [s for s in rows if "update.ratio" in rows[s]] == [0, 3, 6]
    for step in (0, 3, 6):
        ratio = _value(r0["rows"], step, "update.ratio")
        assert ratio == pytest.approx(r0["ratios"][step], rel=1e-4)


def test_rows_too_short_drop_one_report_and_grow_on_every_rank(ranks):
    r0, r1 = (r["tight"] for r in ranks)
    assert r0["steps"] == [1, 2] and r1["steps"] == []
    assert r0["capacities"] == r1["capacities"] and r0["dropped"] == r1["dropped"] == 1
    # Grown to fit, then trimmed to twice what the reports need.
    assert r0["capacities"][0] >= r0["used"] and r0["capacities"][-1] < 4 * r0["used"] + 64


def test_a_nan_on_one_rank_stops_both_at_the_same_step(ranks):
    r0, r1 = (r["nonfinite"] for r in ranks)
    assert r0["stop"] is not None and r0["stop"] == r1["stop"] >= 2


# -- the reduction table and the header, without processes ------------------------------------


def test_every_catalogue_metric_says_how_ranks_combine_it():
    from logitwatch.agent.monitoring.reduce import OPS, RANK_REDUCE
    from logitwatch.metrics import CATALOGUE

    assert set(CATALOGUE) <= set(RANK_REDUCE)
    assert set(RANK_REDUCE.values()) <= set(OPS)


def test_combine_reduces_each_series_by_its_metric():
    from logitwatch.agent.monitoring.reduce import DEN, combine, make_plan
    from logitwatch.agent.transport.sink import series_key as k

    layout = [
        (0, (k("attn.logit_max", layer=0), k("logz.mean"), k("logz.std"), k("act.rms", layer=0))),
        (4, (k("grad.norm"), k("_nonfinite.grads"))),
        (6, (k("update.ratio"),)),
        (7, ((DEN + "update.ratio", ()),)),
        (8, (k("logz.min"),)),
    ]
    plan = make_plan(layout, 9, per_rank=False, device=torch.device("cpu"))
    nan = float("nan")
    values = torch.tensor(
        [
            [3.0, 1.0, 0.5, 2.0, 4.0, 0.0, 1.0, 4.0, nan],
            [5.0, 3.0, 1.5, 4.0, 12.0, 2.0, 3.0, 4.0, 7.0],
        ],
        dtype=torch.float64,
    )
    flags = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    out = combine(flags, values, plan, rank=0).tolist()
    assert out[0] == 5.0  # max
    assert out[1] == 2.0  # mean
    # pooled std over equal halves: sqrt(mean(std² + mean²) - mean²)
    assert out[2] == pytest.approx(math.sqrt((0.25 + 1 + 2.25 + 9) / 2 - 4))
    assert out[3] == pytest.approx(math.sqrt((4 + 16) / 2))  # RMS over the union
    assert out[4] == 4.0 and out[5] == 2.0  # sqrt(4 + 12); counts add up
    assert out[6] == pytest.approx(math.sqrt(4 / 8))  # sqrt(Σ num / Σ den)
    assert out[8] == 7.0  # rank 0 did not write logz.min: rank 1's alone, its stale NaN unseen
    values[1, 0] = nan  # a NaN a rank did write is never hidden by the other ranks'
    assert math.isnan(combine(flags, values, plan, rank=0)[0])
    own = make_plan(layout, 9, per_rank=True, device=torch.device("cpu"))
    mine = combine(flags, values, own, rank=1).tolist()
    assert mine[1] == 3.0 and mine[4] == 4.0  # own loss-like values; norms stay global


def test_rank0s_alerts_reach_the_other_ranks_by_rule_severity_and_step():
    from logitwatch.agent.monitoring.distributed import _ALERTS, HEADER, _decode, _encode

    alerts = [
        {"rule": "attn-logit-critical", "severity": "critical", "first_step": 12, "fired_step": 14},
        {"rule": "x" * 40, "severity": "warning", "first_step": None},
        {"rule": "nonfinite", "severity": "critical", "first_step": 7},  # no fired_step given
    ]
    encoded = _encode(alerts)
    assert len(encoded) == HEADER - _ALERTS  # the fixed tail of the header
    got = _decode(encoded)
    assert [(a["rule"], a["severity"], a["first_step"], a["fired_step"]) for a in got] == [
        ("attn-logit-critical", "critical", 12, 14),
        ("x" * 24, "warning", None, None),
        ("nonfinite", "critical", 7, 7),
    ]
    assert all(a["source"] == "rank 0" for a in got)
