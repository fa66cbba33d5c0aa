"""Probes on Hugging Face transformers models (random weights, built from configs) and the
Trainer callback with a real Trainer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from logitwatch.agent import LogitwatchCallback, Monitor  # noqa: E402
from logitwatch.agent.transport.sink import MemorySink, series_key  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T, B = 128, 16, 2


def gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=T)
    return transformers.GPT2LMHeadModel(cfg, **kw)


def llama(**kw):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=T, **kw,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def qwen2(**kw):
    cfg = transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=T, **kw,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg)


def record_qk(model):
    """Recompute each layer's q and k from its attention input, as the model does."""
    seen = {}
    for m in model.modules():
        if type(m).__name__ == "GPT2Attention":

            def pre(mod, args, kwargs):
                h = kwargs.get("hidden_states", args[0] if args else None)
                q, k, _ = mod.c_attn(h).split(mod.embed_dim, dim=2)
                q, k = (t.view(*t.shape[:2], -1, mod.head_dim).transpose(1, 2) for t in (q, k))
                seen[mod.layer_idx] = (q.detach(), k.detach(), mod.scaling)

        elif type(m).__name__ in ("LlamaAttention", "Qwen2Attention"):

            def pre(mod, args, kwargs):
                h = kwargs.get("hidden_states", args[0] if args else None)
                shape = (*h.shape[:2], -1, mod.head_dim)
                q = mod.q_proj(h).view(shape).transpose(1, 2)
                k = mod.k_proj(h).view(shape).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
                seen[mod.layer_idx] = (q.detach(), k.detach(), mod.scaling)

        else:
            continue
        m.register_forward_pre_hook(pre, with_kwargs=True)
    return seen


def direct_max(q, k, scale):
    """Per-head max |q·k·scale| over every causal logit."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return att.abs().amax(dim=(0, 2, 3))


@pytest.mark.parametrize(
    "build", [gpt2, llama, qwen2, lambda: llama(attn_implementation="eager")],
    ids=["gpt2", "llama", "qwen2", "llama-eager"],
)  # fmt: skip
def test_all_probes_on_transformers_models(build):
    torch.manual_seed(0)
    model, sink = build(), MemorySink()
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    seen = record_qk(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, opt, run="hf", sink=sink) as monitor:
        idx = torch.randint(0, V, (B, T))
        out = model(input_ids=idx, labels=idx)
        out.loss.backward()
        opt.step()
        monitor.step(0, loss=out.loss, tokens=idx.numel())
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before  # the wrapper is gone
    values = sink.rows[0][2]
    with torch.no_grad():
        for layer in range(2):
            q, k, scale = seen[layer]
            want = direct_max(q, k, scale)
            for h in range(4):
                got = values[series_key("attn.logit_max", layer=layer, head=h)]
                assert got == pytest.approx(float(want[h]), rel=1e-4)
            for name in (
                "act.rms",
                "attn.entropy_mean",
                "attn.q_norm",
                "grad.norm",
                "update.ratio",
            ):
                assert series_key(name, layer=layer) in values, name
        lm_logits = out.logits.detach()
        assert values[series_key("logits.max_abs")] == pytest.approx(
            float(lm_logits.abs().max()), rel=1e-5
        )
        log_z = torch.logsumexp(lm_logits.reshape(-1, V), -1)
        assert values[series_key("logz.mean")] == pytest.approx(float(log_z.mean()), rel=1e-5)
    assert values[series_key("loss")] == pytest.approx(float(out.loss.detach()), rel=1e-6)
    assert {"param.norm", "lr", "nonfinite.count"} <= {k[0] for k in values}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, V, (n, T), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_callback_reports_pre_clip_grad_norm(tmp_path):
    torch.manual_seed(0)
    sink = MemorySink()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, max_grad_norm=1e-3, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callback = LogitwatchCallback("hf-trainer", every=2, sink=sink)
    trainer = transformers.Trainer(
        model=llama(), args=args, train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train()
    assert callback.monitor is None  # closed at the end of training
    steps, grad = sink.series("grad.norm")
    assert steps == [1, 2, 4]
    logged = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}
    for step, value in zip(steps, grad, strict=True):
        assert value == pytest.approx(logged[step]["grad_norm"], rel=1e-4)  # before clipping
        assert value > 1e-2  # clipping at 1e-3 was active
        assert sink.series("loss")[1][steps.index(step)] == pytest.approx(
            logged[step]["loss"], abs=1e-3
        )
    assert sink.series("attn.logit_max", layer=1, head=3)[0] == [1, 2, 4]
    assert sink.series("lr", group=0)[0] == [1, 2, 4]
    assert sink.runs["hf-trainer"]["config"]["model"]["num_hidden_layers"] == 2


def test_trainer_callback_names_undelivered_points_at_train_end(tmp_path, caplog):
    from helpers.server import free_port

    from logitwatch.agent import MonitorConfig

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    down = f"http://127.0.0.1:{free_port()}"  # nobody listens: every point stays spooled
    callback = LogitwatchCallback("hf-down", server=down, spool_dir=tmp_path / "spool",
                                  config=MonitorConfig(close_timeout_s=1.0))  # fmt: skip
    trainer = transformers.Trainer(model=llama(), args=args, train_dataset=Tokens(),
                                   callbacks=[callback])  # fmt: skip
    with caplog.at_level("WARNING", logger="logitwatch.agent"):
        trainer.train()
    u = callback.undelivered
    assert u is not None and u.steps == 2 and u.spool_dir == (tmp_path / "spool").resolve()
    assert u.command == f"logitwatch sync {u.spool_dir} --server {down}"
    assert any(u.command in r.getMessage() for r in caplog.records)
