"""torch.compile: the probes trace into the compiled forward with no graph break; a reporting
and a non-reporting graph are compiled once each and then reused without recompiling; the
non-reporting graph is the plain model's; the values are eager's.

The backend is dynamo with AOT autograd (``aot_eager``): graph breaks, guards and recompiles
are dynamo's and the probes' in-place ops go through AOT's functionalisation, as with
inductor, without inductor's C++ build (minutes on 2 cores); ``benchmarks/agent_overhead.py``
runs the inductor arm.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from logitwatch.agent import Monitor
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T, B = 64, 16, 2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No graph, counter or hook-guard setting (a Monitor turns the guard on) leaks in or out."""
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        torch._dynamo.reset()
        counters.clear()
        yield
        torch._dynamo.reset()


def tiny() -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=T
    )
    return Decoder(cfg)


def run(backend: str | None, steps: int, every: int, warmup: int = 2) -> MemorySink:
    """Train with a Monitor on ``torch.compile(model)`` (eager when backend is None); after
    ``warmup`` steps (one reporting, one not) any recompilation raises."""
    model = tiny()
    if backend is not None:
        model = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    sink = MemorySink()
    with Monitor(model, opt, run="c", sink=sink, every=every) as monitor:
        for step in range(steps):
            with torch._dynamo.config.patch(error_on_recompile=step >= warmup):
                idx = torch.randint(0, V, (B, T), generator=g)
                ce, z = loss_fn(model(idx), idx, z_loss=1e-4)
            (ce + z).backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=ce + z, loss_z=z, tokens=idx.numel())
    return sink


def test_compiled_model_reports_eagers_values_with_no_graph_break_and_no_recompile():
    eager = run(None, steps=6, every=2)
    compiled = run("aot_eager", steps=6, every=2)  # raises on a recompile after warm-up
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # reporting and non-reporting forward
    assert [s for s, _, _ in compiled.rows] == [s for s, _, _ in eager.rows] == [0, 2, 4]
    for (_, _, want), (_, _, got) in zip(eager.rows, compiled.rows, strict=True):
        assert got.keys() == want.keys()
        assert sum(k[0] == "attn.logit_max" for k in got) == 8  # 2 layers x 4 heads
        for key in want:
            if key[0] != "throughput.tokens_per_s":
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_the_non_reporting_graph_is_the_plain_models_graph():
    graphs: list[list[str]] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op.startswith("call_")])
        return gm.forward

    plain = torch.compile(tiny(), backend=record)
    idx = torch.randint(0, V, (B, T))
    # Hook guards on, as any Monitor created before this compile leaves them: otherwise the
    # watched model (same class) would reuse the plain graph (see the last test).
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        plain(idx).sum().backward()
        run(record, steps=3, every=10)  # step 0 reports, steps 1 and 2 do not
    assert len(graphs) == 3
    plain_graph, reporting, quiet = graphs
    assert quiet == plain_graph  # the hooks add nothing to a non-reporting step
    assert len(reporting) > len(quiet)


def test_a_model_compiled_before_the_monitor_is_named_in_a_warning(caplog):
    model = torch.compile(tiny(), backend="eager")
    idx = torch.randint(0, V, (B, T))
    model(idx).sum().backward()  # compiled before the probes existed: the graph has no hooks
    assert torch._dynamo.config.skip_nnmodule_hook_guards  # torch's default: not guarded
    with Monitor(model, run="c", sink=MemorySink()) as monitor, caplog.at_level("WARNING"):
        model(idx).sum().backward()
        monitor.step(0, loss=1.0)
        model(idx).sum().backward()
        monitor.step(1, loss=1.0)
    told = [r.getMessage() for r in caplog.records if "no model probe fired" in r.getMessage()]
    assert len(told) == 1 and "before the model's first compiled forward" in told[0]


def test_compiled_and_checkpointed_blocks_report_eagers_values():
    """Checkpointed regions trace the probes' writes into the forward only when dynamo may skip
    replaying them in the recompute, which is the probes' own rule (one reading per step)."""
    from torch.utils.checkpoint import checkpoint

    def sink_of(backend: str | None) -> MemorySink:
        model = tiny()
        for block in model.blocks:
            f = block.forward
            block.forward = lambda x, c, s, f=f: checkpoint(f, x, c, s, use_reentrant=False)
        sink = MemorySink()
        with Monitor(model, run="c", sink=sink, every=2) as monitor:
            fwd = torch.compile(model, backend=backend) if backend else model
            g = torch.Generator().manual_seed(1)
            for step in range(4):
                idx = torch.randint(0, V, (B, T), generator=g)
                loss_fn(fwd(idx), idx, 0.0)[0].backward()
                monitor.step(step, loss=1.0)
        return sink

    eager = sink_of(None)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        compiled = sink_of("aot_eager")
    assert dict(counters["graph_break"]) == {}
    assert [s for s, _, _ in compiled.rows] == [s for s, _, _ in eager.rows] == [0, 2]
    for (_, _, want), (_, _, got) in zip(eager.rows, compiled.rows, strict=True):
        assert got.keys() == want.keys() and any(k[0] == "attn.logit_max" for k in got)
        for key in want:
            if key[0] != "throughput.tokens_per_s":
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
