"""AdamW groups (what decays) and clipping inside step(), seen by a pre-hook before clipping."""

import doctest

import pytest
import torch
from torch import nn

import logitwatch.agent.reference.optim as optim_mod
from logitwatch.agent.reference.optim import ClippedAdamW, build_optimizer


class Tiny(nn.Module):
    """Embedding, norms, biased and unbiased linears, a bare learned-position Parameter, tied head."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(16, 8)
        self.pos_emb = nn.Parameter(torch.zeros(4, 8))
        self.norm = nn.RMSNorm(8)
        self.fc = nn.Linear(8, 8, bias=True)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb[: idx.size(1)]
        return self.head(self.ln(self.fc(self.norm(x))))


def _groups(opt):
    return {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}


def test_doctests():
    assert doctest.testmod(optim_mod).failed == 0


def test_only_matrices_decay_and_tied_embedding_does_not():
    model = Tiny(tie=True)
    opt = build_optimizer(model, lr=1e-3)
    groups = _groups(opt)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert groups["decay"] == {id(model.fc.weight)}
    assert id(model.tok_emb.weight) in groups["no_decay"]  # the tied head's weight included
    assert id(model.pos_emb) in groups["no_decay"]
    for p in (model.norm.weight, model.fc.bias, model.ln.weight, model.ln.bias):
        assert id(p) in groups["no_decay"]
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params  # each exactly once
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_untied_head_decays_and_embeddings_on_request():
    model = Tiny(tie=False)
    assert id(model.head.weight) in _groups(build_optimizer(model, 1e-3))["decay"]
    groups = _groups(build_optimizer(model, 1e-3, decay_embeddings=True))
    assert id(model.tok_emb.weight) in groups["decay"]


def test_weight_decay_is_decoupled_and_skips_no_decay():
    model = Tiny(tie=False)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before_fc, before_norm = model.fc.weight.detach().clone(), model.norm.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient signal: only decay can move a weight
    opt.step()
    assert torch.allclose(model.fc.weight, before_fc * (1 - 0.1 * 0.5))
    assert torch.equal(model.norm.weight, before_norm)


def test_clipping_inside_step_and_pre_hook_sees_raw_gradient():
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).step()  # patches AdamW.step with hooks
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, clip_grad_norm=0.5)
    seen = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        )
    )
    model(torch.randint(0, 16, (2, 4))).pow(2).sum().mul(100).backward()
    opt.step()
    assert len(seen) == 1  # the hook ran once, not once per class in the MRO
    raw = seen[0]
    assert raw > 0.5
    assert torch.allclose(opt.last_grad_norm, raw)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert clipped == pytest.approx(0.5, rel=1e-4)


def test_no_clipping_when_off_but_norm_still_reported():
    p = nn.Parameter(torch.zeros(2))
    opt = ClippedAdamW([p], lr=1e-3, clip_grad_norm=None)
    p.grad = torch.tensor([30.0, 40.0])
    opt.step()
    assert float(opt.last_grad_norm) == 50.0
    assert torch.equal(p.grad, torch.tensor([30.0, 40.0]))


def test_closure_is_evaluated_before_clipping():
    p = nn.Parameter(torch.ones(2))
    opt = ClippedAdamW([p], lr=1e-3, clip_grad_norm=1.0)

    def closure():
        opt.zero_grad()
        loss = (p * 10).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 20.0
    assert float(opt.last_grad_norm) == pytest.approx(200**0.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0}, "lr"),
        ({"lr": 1e-3, "weight_decay": -1}, "weight_decay"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"),
        ({"lr": 1e-3, "clip_grad_norm": 0}, "clip_grad_norm"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_optimizer(Tiny(), **kwargs)


def test_per_parameter_norms_are_kept_and_make_the_total():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, clip_grad_norm=0.5)
    model(torch.randint(0, 16, (2, 4))).pow(2).sum().mul(100).backward()
    raw = {id(p): p.grad.norm() for p in model.parameters()}
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    assert set(opt.last_grad_norms) == set(raw)
    for key, norm in raw.items():  # before clipping, each gradient's own norm
        assert torch.allclose(opt.last_grad_norms[key], norm)
    torch.testing.assert_close(opt.last_grad_norm, total)
    assert total > 0.5  # it clipped, so post-clip norms would differ


def test_no_per_parameter_norms_for_mixed_dtypes_but_the_total_is_right():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = ClippedAdamW([a, b], lr=1e-3, clip_grad_norm=None)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0], dtype=torch.float64)
    opt.step()
    assert opt.last_grad_norms is None
    assert float(opt.last_grad_norm) == pytest.approx(5.0)
