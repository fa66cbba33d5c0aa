"""The zoo's other training loops: tiny Hugging Face models under ``transformers.Trainer`` with
``LogitwatchCallback``, and a user's own decoder under ``attach``, on the zoo's byte corpus.

They exist so that the healthy matrix covers the loops users run, not only the reference
trainer: each declares nothing about its schedule (the service sees only the ``lr`` series).
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import torch
from torch import nn

__all__ = ["HF_MODELS", "UserDecoder", "train_attach", "train_hf"]

HF_MODELS = ("gpt2", "llama", "qwen2")
LR = 1e-3  # an ordinary peak LR for a tiny model, with 10 % warmup and cosine decay
WEIGHT_DECAY = 0.1


def _warmup(steps: int) -> int:
    return min(100, steps // 10)


def _windows(scale: Any, seed: int) -> torch.Tensor:
    """(steps * batch, seq_len) byte windows of the zoo corpus, drawn with the run's seed."""
    from logitwatch.agent.reference.data import BatchSampler, build_corpus

    corpus = build_corpus(scale.corpus_bytes)
    sampler = BatchSampler(corpus.train, scale.batch_size, scale.seq_len, seed)
    return torch.cat([sampler.sample()[0] for _ in range(scale.steps)])


def _hf_model(name: str, scale: Any) -> nn.Module:
    import transformers

    d, layers, heads = scale.d_model, scale.n_layers, scale.n_heads
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=layers, n_embd=d, n_head=heads, vocab_size=256, n_positions=scale.seq_len,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(
        num_hidden_layers=layers, hidden_size=d, intermediate_size=4 * d,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=256,
        max_position_embeddings=scale.seq_len,
    )  # fmt: skip
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))


def train_hf(name: str, scale: Any, seed: int, run: str, sink: Any) -> list[float]:
    """Train a tiny ``name`` model with ``transformers.Trainer``; the loss of every step."""
    import transformers

    from logitwatch.agent.integrations.hf import LogitwatchCallback

    transformers.set_seed(seed)
    model = _hf_model(name, scale)
    rows = _windows(scale, seed)

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": rows[i], "labels": rows[i]}  # the model shifts the labels

    with tempfile.TemporaryDirectory(prefix="lwzoo-hf-") as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=scale.steps, per_device_train_batch_size=scale.batch_size,
            learning_rate=LR, warmup_steps=_warmup(scale.steps), lr_scheduler_type="cosine",
            weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
            seed=seed, data_seed=seed,
        )  # fmt: skip
        callback = LogitwatchCallback(run, every=scale.every, sink=sink)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Windows(), callbacks=[callback]
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # a line a step
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class _RMS(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.w = eps, nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class _Block(nn.Module):
    """Fused qkv, attention written inline (no attention module), a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        from logitwatch.agent import HookPoint

        super().__init__()
        self.heads = heads
        self.n1, self.n2 = _RMS(d), _RMS(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.qk_hook = HookPoint("qk")
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.n1(x)).chunk(3, -1)
        )  # each (B, nh, T, hs)
        q, k = self.qk_hook(q, k)
        att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.n2(x))))


class UserDecoder(nn.Module):
    """A decoder as a user might write it: what ``attach`` is for.

    >>> UserDecoder(d=32, heads=4, layers=2)(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 256])
    """

    def __init__(self, d: int, heads: int, layers: int, seq_len: int = 256) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(256, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm, self.head = _RMS(d), nn.Linear(d, 256, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.size(1)))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, 256)


def train_attach(scale: Any, seed: int, run: str, sink: Any) -> list[float]:
    """Train a ``UserDecoder`` in a plain loop, probes installed by ``attach``; the losses."""
    from logitwatch.agent import Monitor, attach

    torch.manual_seed(seed)
    model = UserDecoder(scale.d_model, scale.n_heads, scale.n_layers, scale.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    warmup, steps = _warmup(scale.steps), scale.steps

    def factor(step: int) -> float:  # linear warmup, cosine to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rows = _windows(scale, seed).view(steps, scale.batch_size, -1)
    losses = []
    with Monitor(model, opt, run=run, sink=sink, every=scale.every) as monitor:
        attach(monitor, attention="blocks.*", qk="qk_hook", logits="head", example=rows[0][:1])
        for step in range(steps):
            x = rows[step]
            logits = model(x[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            monitor.step(step, loss=loss.detach(), tokens=x.numel())
            sched.step()
            losses.append(loss.item())
    return losses
