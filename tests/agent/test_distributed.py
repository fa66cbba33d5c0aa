"""torch.distributed: rank 0 reports by default; per_rank makes every rank report, labelled."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink

V, T, B = 128, 16, 2


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small box: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on both ranks
    model = torch.nn.parallel.DistributedDataParallel(
        Decoder(DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=T))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = {}
    for per_rank in (False, True):
        sink = MemorySink()
        monitor = Monitor(model, opt, run="ddp", sink=sink, config=MonitorConfig(per_rank=per_rank))
        torch.manual_seed(100 + rank)  # different data on each rank
        for step in range(2):
            idx = torch.randint(0, V, (B, T))
            ce, _ = loss_fn(model(idx), idx, z_loss=0.0)
            ce.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=ce, tokens=idx.numel())
        hooked = sum(len(m._forward_hooks) for m in model.modules())
        monitor.close()
        out[str(per_rank)] = {
            "hooked": hooked,
            "rows": [
                [s, [[k[0], dict(k[1]), v] for k, v in vals.items()]] for s, _, vals in sink.rows
            ],
        }
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _value(rows, step, metric, **labels):
    labels = {k: str(v) for k, v in labels.items()}
    (value,) = [
        v for s, vals in rows if s == step for m, lab, v in vals if m == metric and lab == labels
    ]
    return value


def test_rank0_reports_by_default_and_per_rank_labels_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Default: rank 0 alone reports, without a rank label; rank 1 installs nothing.
    assert [s for s, _ in r0["False"]["rows"]] == [0, 1] and r0["False"]["hooked"] > 0
    assert r1["False"]["rows"] == [] and r1["False"]["hooked"] == 0
    assert all("rank" not in lab for _, vals in r0["False"]["rows"] for _, lab, _ in vals)
    # per_rank: both report, each labelled with its rank.
    for rank, res in ((0, r0), (1, r1)):
        rows = res["True"]["rows"]
        assert [s for s, _ in rows] == [0, 1]
        assert all(lab.get("rank") == str(rank) for _, vals in rows for _, lab, _ in vals)
    # Gradients are all-reduced by DDP (equal); activations see each rank's own data (differ).
    g0 = _value(r0["True"]["rows"], 1, "grad.norm", rank=0)
    g1 = _value(r1["True"]["rows"], 1, "grad.norm", rank=1)
    assert abs(g0 - g1) <= 1e-5 * abs(g0)
    a0 = _value(r0["True"]["rows"], 1, "act.rms", layer=1, rank=0)
    a1 = _value(r1["True"]["rows"], 1, "act.rms", layer=1, rank=1)
    assert a0 != a1
