"""The Monitor's contract: reporting cadence, owned hooks, no effect on training, no raising."""

import doctest
import importlib
import logging
import subprocess
import sys

import pytest
import torch

from logitwatch.agent import Monitor, MonitorConfig, attach
from logitwatch.agent.probes.hooks import QKSite
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink, Sink, series_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The package's `attach` function shadows its module of the same name.
attach_module = importlib.import_module("logitwatch.agent.monitoring.attach")

V, T, B = 128, 16, 2


def tiny() -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=T))


def train(model, opt, monitor=None, steps=4):
    torch.manual_seed(1)
    out = []
    for step in range(steps):
        idx = torch.randint(0, V, (B, T))
        logits = model(idx)
        ce, z = loss_fn(logits, idx, z_loss=0.0)
        (ce + z).backward()
        opt.step()
        opt.zero_grad()
        out.append(logits.detach())
        if monitor is not None:
            monitor.step(step, loss=ce + z, tokens=idx.numel())
    return out


def hook_count(model, opt) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = sum(
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()
    )
    return (
        modules + params + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    )


def test_reports_only_every_n_steps_and_hooks_idle_between():
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="t", sink=sink, every=3) as monitor:
        armed = []
        for step in range(7):
            armed.append(monitor.armed)
            train(model, opt, None, steps=1)
            monitor.step(step, loss=1.0)
    assert armed == [True, False, False, True, False, False, True]
    assert [s for s, _, _ in sink.rows] == [0, 3, 6]
    assert sink.series("attn.logit_max", layer=0, head=0)[0] == [0, 3, 6]


def test_hooks_are_removed_on_close():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = hook_count(model, opt)
    for grads in ("optimizer", "backward"):
        monitor = Monitor(model, opt, run="t", sink=MemorySink(), config=MonitorConfig(grads=grads))
        assert hook_count(model, opt) > before
        monitor.close()
        monitor.close()  # idempotent
        assert hook_count(model, opt) == before


def test_training_is_identical_with_and_without_the_monitor():
    plain = tiny()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    want = train(plain, opt)
    watched = tiny()
    opt = torch.optim.AdamW(watched.parameters(), lr=1e-2)
    with Monitor(watched, opt, run="t", sink=MemorySink()) as monitor:
        got = train(watched, opt, monitor)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    for (_, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_failing_probe_is_switched_off_and_training_goes_on(caplog):
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def broken(m, args, kwargs, out):
        raise RuntimeError("probe bug")

    with Monitor(model, opt, run="t", sink=sink) as monitor, caplog.at_level(logging.WARNING):
        sites = attach_module.hookpoint_sites(model)
        sites.qk = [QKSite(s.layer, s.module, broken) for s in sites.qk]
        monitor.use_sites(sites)
        train(model, opt, monitor, steps=3)
    assert len(sink.rows) == 3
    assert not any(k[0].startswith("attn.") for k in sorted(sink.keys()))
    assert sink.series("loss")[0] == [0, 1, 2] and sink.series("act.rms", layer=1)[0] == [0, 1, 2]
    assert sum("probe bug" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_raising_sink_never_reaches_training():
    class Broken(Sink):
        def log(self, step, values, *, time=None):
            raise OSError("disk full")

        def flush(self, timeout=None):
            raise OSError("disk full")

    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, run="t", sink=Broken())
    train(model, opt, monitor, steps=2)
    monitor.step(5, loss=object())  # a bad value is logged, not raised
    monitor.close(timeout=2)


def test_without_optimizer_grads_and_weights_are_read_at_step():
    model, sink = tiny(), MemorySink()
    with Monitor(model, run="t", sink=sink) as monitor:
        idx = torch.randint(0, V, (B, T))
        loss_fn(model(idx), idx, 0.0)[0].backward()
        monitor.step(0, loss=1.5)
    values = sink.rows[0][2]
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert values[series_key("grad.norm")] == pytest.approx(float(want), rel=1e-5)
    assert series_key("param.norm", layer=1) in values and values[series_key("loss")] == 1.5


def test_config_errors_name_the_field():
    for kwargs, field in [
        ({"every": 0}, "every"),
        ({"sample_rows": -1}, "sample_rows"),
        ({"probes": ("attn", "bogus")}, "probes"),
        ({"grads": "sometimes"}, "grads"),
        ({"per_rank": "yes"}, "per_rank"),
        ({"sample_batch": 0}, "sample_batch"),
    ]:
        with pytest.raises(ValueError, match=field):
            MonitorConfig(**kwargs)
    with pytest.raises(ValueError, match="run"):
        Monitor(tiny(), run="", sink=MemorySink())


def test_probes_can_be_switched_off():
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(
        model, opt, run="t", sink=sink, config=MonitorConfig(probes=("loss", "grad"))
    ) as m:
        train(model, opt, m, steps=1)
    assert {k[0] for k in sorted(sink.keys())} == {"loss", "grad.norm", "nonfinite.count"}


def test_alert_callbacks_fire_once_per_alert():
    class Alerting(MemorySink):
        def firing_alerts(self):
            return [{"id": 7, "metric": "attn.logit_max", "first_step": 1}]

    model, seen = tiny(), []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="t", sink=Alerting()) as monitor:
        monitor.on_alert(seen.append)
        train(model, opt, monitor, steps=3)
        monitor.flush()
        assert monitor.firing_alerts() == [{"id": 7, "metric": "attn.logit_max", "first_step": 1}]
    # Callbacks also learn the step the alert went firing at (an older service: its first).
    assert seen == [{"id": 7, "metric": "attn.logit_max", "first_step": 1, "fired_step": 1}]


def test_attach_docstring_example_runs():
    result = doctest.testmod(attach_module, raise_on_error=False)
    assert result.failed == 0 and result.attempted > 5


class Attn(torch.nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.h, self.qkv, self.out = h, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def split(self, x):  # (B, T, d) -> q, k, v each (B, h, T, d/h)
        B, T, _ = x.shape
        return [t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)]

    def forward(self, x):
        q, k, v = self.split(x)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return x + self.attn(x)


class LM(torch.nn.Module):
    """The user model of attach's docstring."""

    def __init__(self):
        super().__init__()
        self.emb, self.layers = torch.nn.Embedding(32, 16), torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(16, 32)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def test_attach_reads_qk_of_a_user_model_exactly():
    model, sink = LM(), MemorySink()
    seen = {}
    model.layers[1].attn.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].detach()))
    with Monitor(model, run="u", sink=sink) as monitor:
        attach(
            monitor, attention="layers.*.attn", qk=lambda m, a, o: m.split(a[0])[:2], logits="head"
        )
        model(torch.randint(0, 32, (2, 8)))
        monitor.step(0, loss=1.0)
    with torch.no_grad():
        q, k, _ = model.layers[1].attn.split(seen["x"])
    att = (q @ k.transpose(-2, -1)) / (q.size(-1) ** 0.5)
    att = att.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), 0.0)
    for h in range(2):
        got = sink.series("attn.logit_max", layer=1, head=h)[1][0]
        assert got == pytest.approx(float(att[:, h].abs().max()), rel=1e-5)  # max |logit|
    assert sink.series("act.rms", layer=0)[0] == [0] and sink.series("logits.rms")[0] == [0]
    with pytest.raises(ValueError, match="attention"):
        attach(model, attention="nothing.*", qk="q")
    with pytest.raises(ValueError, match="logits"):
        attach(model, attention="layers.*.attn", qk=lambda m, a, o: (a[0], a[0]), logits="nope")


def test_non_reporting_steps_run_exactly_the_ops_of_plain_training():
    """Between reporting steps the monitor adds no tensor op at all (hence no device sync)."""

    def ops(model, opt, monitor, step):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            idx = torch.randint(0, V, (B, T))
            loss = loss_fn(model(idx), idx, z_loss=0.0)[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
            if monitor is not None:
                monitor.step(step, loss=loss, tokens=idx.numel())
        return sorted(e.name for e in prof.events() if e.name.startswith("aten::"))

    plain, watched = tiny(), tiny()
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_w = torch.optim.AdamW(watched.parameters(), lr=1e-3)
    with Monitor(watched, opt_w, run="t", sink=MemorySink(), every=10) as monitor:
        reporting = ops(watched, opt_w, monitor, 0)
        ops(plain, opt_p, None, 0)
        quiet = ops(watched, opt_w, monitor, 1)
        assert quiet == ops(plain, opt_p, None, 1)
        assert len(reporting) > len(quiet)


def test_offline_default_is_a_file_sink_under_dot_logitwatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="offline", run_config={"lr": 1e-3}) as monitor:
        train(model, opt, monitor, steps=2)
    path = tmp_path / ".logitwatch" / "runs" / "offline" / "offline.jsonl"
    text = path.read_text()
    assert "attn.logit_max" in text and '"lr": 0.001' in text


def test_importing_the_agent_does_not_import_transformers_or_lightning():
    code = "import sys, logitwatch.agent; print('transformers' in sys.modules or 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
