"""`attach` on a user's own decoder: fused qkv, attention inline in its Block, RMS norms n1/n2."""

import logging
import math

import pytest
import torch
from torch import nn

from logitwatch.agent import HookPoint, Monitor, attach
from logitwatch.agent.probes.reductions import attn_stats
from logitwatch.agent.transport.sink import MemorySink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, D, H, L, T, B = 64, 32, 4, 3, 8, 2


class RMS(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.w = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class Block(nn.Module):
    """Attention written out inline; no attention module of its own."""

    def __init__(self, hook):
        super().__init__()
        self.n1, self.n2 = RMS(D), RMS(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.qk_hook = hook
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def split(self, x):  # (B, T, D) -> q, k, v each (B, H, T, D/H)
        b, t, _ = x.shape
        return [z.view(b, t, H, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1)]

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.split(self.n1(x))
        q, k = self.qk_hook(q, k)
        att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D))
        return x + self.down(nn.functional.gelu(self.up(self.n2(x))))


class UserLM(nn.Module):
    def __init__(self, hook=lambda: HookPoint("qk")):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(hook()) for _ in range(L)])
        self.norm, self.head = RMS(D), nn.Linear(D, V, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def qk_from_block_input(block, args, out):
    """What the tester passed: recompute q, k from the block's input."""
    return block.split(block.n1(args[0]))[:2]


def example():
    return torch.randint(0, V, (1, T))


def train(model, monitor, steps=3):
    opt = monitor.optimizer
    torch.manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, V, (B, T))
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(step, loss=loss, tokens=idx.numel())


def layers_of(sink, metric):
    keys = sink.keys()
    return sorted(dict(lab)["layer"] for m, lab in keys if m == metric and dict(lab).get("layer"))


WAYS = {
    "glob": dict(attention="blocks.*", qk="qk_hook", logits="head"),
    "class": dict(attention=Block, qk="qk_hook", logits="head"),
    "qk-name-only": dict(qk="qk_hook", logits="head"),
    "glob-and-function": dict(attention="blocks.*", qk=qk_from_block_input, logits="head"),
    "no-attach": None,  # Monitor's own discovery of the HookPoint("qk") children
}


@pytest.mark.parametrize("way", list(WAYS))
def test_each_way_of_attaching_gives_every_metric_per_layer_and_head(way):
    model, sink = UserLM(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="u", sink=sink) as monitor:
        if WAYS[way] is not None:
            sites = attach(monitor, **WAYS[way], example=example())
            assert [name for name in sites.layer_prefixes] == [f"blocks.{i}" for i in range(L)]
            assert [m for _, m in sites.resid] == list(model.blocks)
        train(model, monitor)
    steps = [0, 1, 2]
    for layer in range(L):
        for head in range(H):
            assert sink.series("attn.logit_max", layer=layer, head=head)[0] == steps
        assert sink.series("attn.entropy_frac", layer=layer)[0] == steps
        assert sink.series("act.rms", layer=layer)[0] == steps
    layers = [str(i) for i in range(L)]
    for metric in ("attn.entropy_frac", "act.rms", "grad.norm", "param.norm", "update.ratio"):
        assert layers_of(sink, metric) == layers, metric
    if WAYS[way] is not None:
        assert sink.series("logits.rms")[0] == steps


def test_the_probe_reads_the_q_k_and_scale_of_the_inline_attention():
    model, sink = UserLM(), MemorySink()
    seen = {}
    hook = model.blocks[1].qk_hook.register_forward_hook(lambda m, a, o: seen.setdefault("qk", a))
    with Monitor(model, run="u", sink=sink) as monitor:
        attach(monitor, attention="blocks.*", qk="qk_hook")
        model(torch.randint(0, V, (B, T)))
        monitor.step(0, loss=1.0)
    hook.remove()
    q, k = (t.detach() for t in seen["qk"])
    # The reduction's own definition of the metric, on the q and k the block used and the
    # 1/sqrt(head_dim) it divides by: attach's part is handing over exactly these.
    want = attn_stats(q, k, 1 / math.sqrt(q.size(-1)), causal=True)
    for h in range(H):
        got = sink.series("attn.logit_max", layer=1, head=h)[1][0]
        assert got == pytest.approx(float(want[h]), rel=1e-5)


def test_a_glob_matches_one_depth_only():
    sites = attach(UserLM(), attention="blocks.*", qk=qk_from_block_input)
    assert len(sites.qk) == L and [s.layer for s in sites.qk] == list(range(L))
    # '*' inside a part still matches within that part
    assert len(attach(UserLM(), attention="blocks.[01]", qk="qk_hook").qk) == 2


def test_default_blocks_are_the_parents_of_separate_attention_modules():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.qk_hook = nn.Linear(D, 3 * D), HookPoint("qk")

        def forward(self, x):
            return x

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attn(), nn.Linear(D, D)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(Wrapped(), Wrapped())

    model = Model()
    sites = attach(model, attention="layers.*.attn", qk="qk_hook")
    assert sites.layer_prefixes == {"layers.0": 0, "layers.1": 1}
    assert [m for _, m in sites.resid] == list(model.layers)


def test_blocks_that_cannot_be_told_are_warned_about_once_at_attach_time(caplog):
    class Flat(nn.Module):  # attention modules straight on the model, blocks only in forward
        def __init__(self):
            super().__init__()
            self.a0, self.a1 = Block(HookPoint("qk")), Block(HookPoint("qk"))

    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        sites = attach(Flat(), attention=Block, qk="qk_hook")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "blocks=" in warnings[0] and "'a0'" in warnings[0]
    assert sites.resid == [] and sites.layer_prefixes == {}
    sites = attach(Flat(), attention=Block, qk="qk_hook", blocks=["a0", "a1"])
    assert sites.layer_prefixes == {"a0": 0, "a1": 1}


def test_the_trial_forward_leaves_no_trace():
    class Noisy(UserLM):
        def forward(self, idx):
            torch.rand(1)  # a draw the trial must not leave missing from the training's RNG
            return super().forward(idx)

    model = Noisy()
    idx = example()
    rng = torch.get_rng_state()
    attach(model, attention="blocks.*", qk="qk_hook", example=idx)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


# -- each mistake is a ValueError at attach time naming the module and what was expected --------


def wrong_pair(block, args, out):
    return block.qkv(block.n1(args[0]))  # one (B, T, 3D) tensor, not (q, k)


def wrong_shapes(block, args, out):
    return block.qkv(args[0]).chunk(3, -1)[:2]  # (B, T, D): heads not split out


def wrong_attribute(block, args, out):
    return block.attn.split(args[0])[:2]


MISTAKES = {
    "glob matching nothing": (
        dict(attention="block.*", qk="qk_hook"),
        ["attention:", "'block.*'", "UserLM", "one dotted part", "'blocks.0'"],
    ),
    "nested matches": (
        dict(attention=lambda n, m: n.startswith("blocks."), qk="qk_hook"),
        ["attention:", "'blocks.0.n1' (RMS)", "inside 'blocks.0' (Block)"],
    ),
    "a container": (
        dict(attention="blocks", qk="qk_hook"),
        ["attention:", "'blocks' (ModuleList)", "'blocks.*'"],
    ),
    "qk child missing": (
        dict(attention="blocks.*", qk="qk_hk"),
        ["qk:", "'blocks.0' (Block)", "no child named 'qk_hk'", "'qk_hook'"],
    ),
    "qk name matching nothing": (dict(qk="qk_hk"), ["qk:", "'qk_hk'", "attention="]),
    "qk function of the wrong signature": (
        dict(attention="blocks.*", qk=lambda block: block),
        ["qk:", "(attn_module, args, output)"],
    ),
    "qk function returning one tensor": (
        dict(attention="blocks.*", qk=wrong_pair, example=example()),
        ["qk:", "'blocks.0' (Block)", "a tensor of shape (1, 8, 96)", "expected a pair (q, k)"],
    ),
    "qk function returning unsplit heads": (
        dict(attention="blocks.*", qk=wrong_shapes, example=example()),
        ["qk:", "'blocks.0' (Block)", "q (1, 8, 32)", "(batch, heads, tokens, head_dim)"],
    ),
    "qk function raising": (
        dict(attention="blocks.*", qk=wrong_attribute, example=example()),
        ["qk:", "'blocks.0' (Block)", "AttributeError", "'attn'"],
    ),
    "blocks count": (
        dict(attention="blocks.*", qk="qk_hook", blocks="blocks.[01]"),
        ["blocks:", "matched 2 modules", "3 attention layers"],
    ),
    "blocks a container": (
        dict(attention="blocks.*", qk="qk_hook", blocks=["blocks"]),
        ["blocks:", "'blocks' (ModuleList)"],
    ),
    "logits unknown": (
        dict(attention="blocks.*", qk="qk_hook", logits="lm_head"),
        ["logits:", "'lm_head'"],
    ),
    "example the model rejects": (
        dict(attention="blocks.*", qk="qk_hook", example=torch.zeros(1, T)),
        ["example:", "UserLM", "failed on the example"],
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_raises_at_attach_time_naming_the_module(mistake):
    kwargs, wanted = MISTAKES[mistake]
    model, sink = UserLM(), MemorySink()
    with Monitor(model, run="u", sink=sink) as monitor:
        sites = monitor._probes.sites
        with pytest.raises(ValueError) as info:
            attach(monitor, **kwargs)
        assert monitor._probes.sites is sites  # nothing was installed
    for part in wanted:
        assert part in str(info.value), (part, str(info.value))


def test_nn_identity_as_the_qk_hook_point_says_to_use_hookpoint():
    model = UserLM(hook=nn.Identity)
    with pytest.raises(ValueError) as info:
        attach(model, attention="blocks.*", qk="qk_hook")
    message = str(info.value)
    assert "'blocks.0.qk_hook' (Identity)" in message
    assert "child(q, k)" in message and "logitwatch.agent.HookPoint('qk')" in message

    class TakesOne(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"'blocks.0.qk_hook' \(TakesOne\) cannot be called"):
        attach(UserLM(hook=TakesOne), attention="blocks.*", qk="qk_hook")


def test_without_an_example_a_wrong_qk_function_is_named_at_the_first_report(caplog):
    model, sink = UserLM(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="u", sink=sink) as monitor, caplog.at_level(logging.WARNING):
        attach(monitor, attention="blocks.*", qk=wrong_pair)
        train(model, monitor, steps=2)
    failures = [r.getMessage() for r in caplog.records if "probe 'attn' failed" in r.getMessage()]
    assert len(failures) == 1 and "'blocks.0' (Block)" in failures[0]
    assert layers_of(sink, "act.rms") == ["0", "1", "2"]  # the rest goes on
