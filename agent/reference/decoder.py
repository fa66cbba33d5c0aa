"""The reference decoder: a decoder-only transformer carrying every stability technique of the
lecture behind one typed config, so each can be switched on and off and its effect watched.

Reads top to bottom like nanoGPT: hook point -> norms -> RoPE -> attention -> MLP -> block ->
config -> model -> loss. Shapes: B batch, T time, C d_model, nh heads, nkv kv heads, hs head_dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Decoder", "DecoderConfig", "HookPoint", "loss_fn"]

FFN_KINDS = ("relu", "gelu", "swiglu", "geglu", "reglu")
GLU_KINDS = ("swiglu", "geglu", "reglu")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


class HookPoint(nn.Module):
    """An identity module whose only job is to be a named place where probes attach forward hooks.

    >>> q, k = HookPoint("qk", layer=0)(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4))
    """

    def __init__(self, kind: str, layer: int | None = None, **attrs: Any) -> None:
        super().__init__()
        self.kind = kind  # "qk" | "logits" | "resid"
        self.layer = layer
        for name, value in attrs.items():  # e.g. scale, softcap, causal for the qk hook
            setattr(self, name, value)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return tensors[0] if len(tensors) == 1 else tensors


class RMSNorm(nn.Module):
    """x / rms(x) * g over the last dimension, computed in fp32 (bf16 squares lose precision)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps=eps, bias=bias)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta^(-2i/hs) for position m and pair i, each (max_seq_len, hs/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x (B, h, T, hs) by its position's angle."""
    T = x.size(-2)
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, h, T, hs/2, 2)
    x1, x2 = x32[..., 0], x32[..., 1]  # (B, h, T, hs/2)
    cos, sin = cos[:T], sin[:T]  # (T, hs/2), broadcast over B and h
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(x / c): near identity for |x| << c, bounded by c (Gemma 2: 50 attention, 30 final)."""
    return cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.cap = cfg.softcap_attn
        self.dropout_attn = cfg.dropout_attn
        # sdpa cannot soft-cap the logits, so a cap forces the explicit path.
        self.use_sdpa = cfg.attn_impl == "sdpa" or (
            cfg.attn_impl == "auto" and not cfg.softcap_attn
        )
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        # QK-norm: RMSNorm over each head's head_dim, one gain shared by the heads (as in Gemma 3).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.rope = cfg.pos == "rope"
        self.qk_hook = HookPoint(
            "qk", layer=layer, scale=self.scale, softcap=cfg.softcap_attn, causal=True
        )
        self.attn_drop = nn.Dropout(cfg.dropout_attn)
        self.resid_drop = nn.Dropout(cfg.dropout_resid)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.qk_hook(q, k)  # probes read q and k here: flash attention never shows q·k
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout_attn if self.training else 0.0,
                is_causal=True,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, nh, T, hs)
        else:
            group = self.n_heads // self.n_kv_heads  # query heads per kv head (GQA/MQA)
            k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
            if self.cap:
                att = softcap(att, self.cap)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf"))
            att = self.attn_drop(F.softmax(att.float(), dim=-1).type_as(v))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hs)
        return self.resid_drop(self.wo(y))  # (B, T, C)


class MLP(nn.Module):
    """relu/gelu: W_out act(W_in x). GLU kinds: W_out (act(W_gate x) * W_in x) (Shazeer 2020)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg.ffn]
        self.w_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_gate = (
            nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.ffn in GLU_KINDS else None
        )
        self.w_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout_resid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is None:
            h = self.act(self.w_in(x))  # (B, T, d_ff)
        else:
            h = self.act(self.w_gate(x)) * self.w_in(x)  # (B, T, d_ff)
        return self.resid_drop(self.w_out(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.norm_attn = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, layer)
        self.norm_mlp = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg)
        self.resid_hook = HookPoint("resid", layer=layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), cos, sin)  # (B, T, C)
        x = x + self.mlp(self.norm_mlp(x))  # (B, T, C)
        return self.resid_hook(x)


def default_d_ff(d_model: int, ffn: str) -> int:
    """4·d_model; 8/3·d_model for GLU kinds (same parameters as 4x with a third matrix)."""
    if ffn not in GLU_KINDS:
        return 4 * d_model
    d_ff = 8 * d_model / 3
    # Multiples of 64 suit matmul tiles; below 192 that rounding would distort the ratio too much.
    return int(round(d_ff / 64) * 64) if d_model >= 192 else round(d_ff)


@dataclass
class DecoderConfig:
    """Every hyperparameter of the decoder; ``None`` fields are resolved in ``__post_init__``.

    >>> cfg = DecoderConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, ffn="swiglu")
    >>> cfg.head_dim, cfg.n_kv_heads, cfg.d_ff
    (16, 4, 171)
    """

    vocab_size: int = 256  # byte-level tokens by default
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: int | None = None  # None -> d_model // n_heads (ratio 1; T5 uses 16)
    n_kv_heads: int | None = None  # None -> n_heads; 1 is multi-query (PaLM), 8 GQA (LLaMA 2 70B)
    d_ff: int | None = None  # None -> 4·d_model, or 8/3·d_model for GLU kinds
    ffn: str = "swiglu"  # relu | gelu | swiglu | geglu | reglu
    norm: str = "rms"  # pre-norm RMSNorm (LLaMA) or LayerNorm (GPT-3)
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on each head's q and k: bounds the attention logits
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    softcap_attn: float | None = None  # c·tanh(x/c) on attention logits (Gemma 2: 50)
    softcap_final: float | None = None  # c·tanh(x/c) on output logits (Gemma 2: 30)
    z_loss: float = 0.0  # coef·logsumexp², keeps log Z near 0 (PaLM: 1e-4); 0 = off
    dropout_attn: float = 0.0  # pre-training sees each token about once: no dropout
    dropout_resid: float = 0.0
    tie_embeddings: bool = False  # GPT-style shared input/output embedding, or separate (LLaMA)
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-3 had them)
    attn_impl: str = "auto"  # auto: sdpa unless the config needs the eager path | sdpa | eager
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("head_dim", "n_kv_heads", "d_ff"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name, allowed in (
            ("ffn", FFN_KINDS),
            ("norm", ("rms", "layer")),
            ("pos", ("rope", "learned")),
            ("attn_impl", ("auto", "sdpa", "eager")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                )
        for name in ("qk_norm", "tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}.")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                    "unless head_dim is given."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})."
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (pairs rotate); got {self.head_dim}.")
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.ffn)
        for name in ("norm_eps", "rope_theta", "init_std"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("softcap_attn", "softcap_final"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), positive=True, hint="or null for off")
        _check_float("z_loss", self.z_loss)
        for name in ("dropout_attn", "dropout_resid"):
            _check_float(name, getattr(self, name))
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
        if self.attn_impl == "sdpa" and self.softcap_attn:
            raise ValueError(
                "attn_impl 'sdpa' cannot soft-cap attention logits: use 'auto' or 'eager', "
                "or set softcap_attn to null."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                raise ValueError(f"unknown config key {key!r}; allowed: {', '.join(allowed)}.")
        return cls(**d)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _check_float(name: str, value: Any, positive: bool = False, hint: str = "") -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name} must be a number {bound}{' ' + hint if hint else ''}; got {value!r}."
        )


class Decoder(nn.Module):
    """The decoder-only transformer; ``forward(idx)`` returns logits after the final soft-cap.

    >>> model = Decoder(DecoderConfig(n_layers=2, d_model=64, n_heads=4))
    >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 256])
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout_resid)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_final = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.logits_hook = HookPoint("logits")
        # Non-persistent: recomputed from the config, never stored in checkpoints.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale each residual branch's output projection by 1/sqrt(2·n_layers) so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w_out.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves out the token and
        position embeddings and an untied output head, as in Kaplan et al.'s scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq_len = idx.size(1)
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}."
            )
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            pos = torch.arange(seq_len, device=idx.device)  # (T,)
            x = x + self.pos_emb(pos)  # (T, C) broadcast over B
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)  # (B, T, C)
        logits = self.lm_head(self.norm_final(x))  # (B, T, V)
        logits = self.logits_hook(logits)  # probes see the logits before soft-capping
        if self.config.softcap_final:
            logits = softcap(logits, self.config.softcap_final)
        return logits


def loss_fn(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and the z-loss term ``z_loss·mean(logsumexp(logits)²)``, both in fp32.

    Returned apart so that both can be reported; train on ``ce + z``. z is 0 when z_loss is 0.
    """
    logits = logits.float().flatten(
        0, -2
    )  # (B*T, V): bf16's 8-bit mantissa is too coarse for log Z
    targets = targets.flatten()  # (B*T,)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if not z_loss:
        return ce, torch.zeros((), device=logits.device)
    # A masked mean, not boolean indexing: indexing needs the count on the host (a device sync).
    keep = (targets != ignore_index).float()  # (B*T,)
    log_z2 = torch.logsumexp(logits, dim=-1).pow(2)  # (B*T,)
    return ce, z_loss * (log_z2 * keep).sum() / keep.sum().clamp_min(1.0)
