"""DDP, FSDP2 and a plain model on 2 gloo ranks report what one process computes unsharded.

The reference trains the same model, from the same weights, on both ranks' batches at once;
rank 0's report must match it (norms exactly, per-rank signals by their reduction), and each
reporting step must cost exactly one collective of the Monitor and none between reports.
"""

import json
import math

import pytest
import torch
from helpers.ranks import collectives_so_far, spawn_ranks

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink

V, T, B, STEPS = 64, 16, 2, 3
SETUPS = ("ddp", "fsdp", "fsdp-per-rank", "plain")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in every process
    return Decoder(DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=T))


def _batch(step: int) -> torch.Tensor:
    """Both ranks' batches of a step: rank r trains on rows r*B:(r+1)*B."""
    return torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(step))


def _train(model, idx_of, config, sink, counts=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, run="r", sink=sink, config=config)
    for step in range(STEPS):
        idx = idx_of(step)
        ce, _ = loss_fn(model(idx), idx, z_loss=0.0)
        ce.backward()
        before = collectives_so_far() if counts is not None else 0
        opt.step()  # the grad, param and update probes run in its hooks
        opt.zero_grad()
        monitor.step(step, loss=ce, tokens=idx.numel())
        if counts is not None:
            counts.append(collectives_so_far() - before)
    monitor.close()
    return monitor


def _rows(sink: MemorySink) -> list:
    return [[s, [[k[0], dict(k[1]), v] for k, v in vals.items()]] for s, _, vals in sink.rows]


def _worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for setup in SETUPS:
        model = _model()
        if setup == "ddp":
            model = DistributedDataParallel(model)
        elif setup.startswith("fsdp"):
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        sink, counts = MemorySink(), []
        every = 2 if setup == "fsdp" else 1
        config = MonitorConfig(every=every, param_every=every, per_rank=setup.endswith("rank"))
        if setup == "plain":  # no wrapper, the same batch on every rank: replicas
            idx_of = lambda step: _batch(step)[:B]  # noqa: E731
        else:
            idx_of = lambda step: _batch(step)[rank * B : (rank + 1) * B]  # noqa: E731
        monitor = _train(model, idx_of, config, sink, counts)
        out[setup] = {"rows": _rows(sink), "counts": counts, "own": monitor.ranks.collectives}
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def _reference(idx_of) -> dict:
    sink = MemorySink()
    _train(_model(), idx_of, MonitorConfig(every=1, param_every=1), sink)
    return {(s, m, tuple(sorted(lab.items()))): v for s, vals in _rows(sink) for m, lab, v in vals}


def _by_key(rows) -> dict:
    return {(s, m, tuple(sorted(lab.items()))): v for s, vals in rows for m, lab, v in vals}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_worker, str(tmp))
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def references(one_torch_thread):
    return {
        "both": _reference(lambda step: _batch(step)),  # what DDP and FSDP2 train on, together
        "one": _reference(lambda step: _batch(step)[:B]),
    }


def _compare(got: dict, want: dict, steps) -> None:
    checked = 0
    for (step, metric, labels), value in want.items():
        if step not in steps or metric.startswith("throughput"):
            continue
        key = (step, metric, labels)
        assert key in got, f"rank 0 did not report {key}"
        if metric == "attn.entropy_min":  # the least of the ranks' per-head minima: a bound
            assert got[key] <= value + 1e-5, key
            continue
        rel = 2e-3 if metric == "update.ratio" else 1e-4  # a difference of two close weights
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-6), key
        checked += 1
    assert checked > 30


@pytest.mark.parametrize("setup", ["ddp", "fsdp"])
def test_rank0_reports_what_the_unsharded_model_computes(ranks, references, setup):
    r0, r1 = ranks
    steps = [0, 2] if setup == "fsdp" else [0, 1, 2]
    assert [s for s, _ in r0[setup]["rows"]] == steps and r1[setup]["rows"] == []
    # Grad, param and update norms exactly; per-rank signals by their reduction: max of maxima,
    # mean of means, RMS over the union, the pooled log Z std, the mean loss.
    _compare(_by_key(r0[setup]["rows"]), references["both"], steps)
    got = _by_key(r0[setup]["rows"])
    assert got[(steps[-1], "nonfinite.count", ())] == 0.0


def test_a_plain_replicated_model_reports_its_own_values(ranks, references):
    r0, _ = ranks
    _compare(_by_key(r0["plain"]["rows"]), references["one"], [0, 1, 2])


def test_per_rank_labels_own_values_and_keeps_norms_global(ranks, references):
    want = references["both"]
    for rank, res in enumerate(ranks):
        got = _by_key(res["fsdp-per-rank"]["rows"])
        assert got and all(dict(lab).get("rank") in (str(rank), None) for _, _, lab in got)
        for metric in ("grad.norm", "param.norm", "update.ratio"):
            for layer in ((), (("layer", "0"),), (("layer", "1"),)):
                mine = got[(2, metric, tuple(sorted((*layer, ("rank", str(rank))))))]
                rel = 2e-3 if metric == "update.ratio" else 1e-4
                assert mine == pytest.approx(want[(2, metric, layer)], rel=rel)
    # Per-rank signals are each rank's own: their RMS is the unsharded model's.
    a0, a1 = (
        _by_key(r["fsdp-per-rank"]["rows"])[(1, "act.rms", (("layer", "1"), ("rank", str(i))))]
        for i, r in enumerate(ranks)
    )
    assert a0 != a1
    assert math.sqrt((a0**2 + a1**2) / 2) == pytest.approx(
        want[(1, "act.rms", (("layer", "1"),))], rel=1e-4
    )


def test_one_collective_per_reporting_step_and_none_between(ranks):
    for res in ranks:
        for setup in SETUPS:
            counts, reports = res[setup]["counts"], [0, 2] if setup == "fsdp" else [0, 1, 2]
            # Around opt.step() and monitor.step(): FSDP2's own collectives are all in
            # forward and backward, so every one counted here is the Monitor's.
            assert counts == [1 if s in reports else 0 for s in range(STEPS)], setup
            assert res[setup]["own"] == len(reports)
