"""The agent's checks that need a GPU, as one short script: run it where there is one.

1. **No synchronisation between reports**: ``agent_overhead.py --sync-check``'s loop, every
   non-reporting step under ``torch.cuda.set_sync_debug_mode("error")``.
2. **The bf16 path**: the reference decoder under bf16 autocast with a Monitor reporting every
   step. The attention maximum it reports for a layer (a bf16 matmul on the device) is compared
   with the exact maximum of the same q and k upcast to fp32; then step time with and without
   the Monitor (CUDA events, arms interleaved, the paired ratios of agent_overhead.py).
3. **FSDP2 on one rank** (``fully_shard`` on each block and on the model, a one-process NCCL
   group): the gradient and weight norms the Monitor reports against the same model trained
   unsharded on the same batches.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json]

``--device cpu`` runs the same code on the CPU, with small sizes and a gloo group: a smoke test
of the script itself (the tests run it), not a GPU figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_overhead import paired_ratio, quiet_steps

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.reference.optim import build_optimizer
from logitwatch.agent.transport.sink import MemorySink
from logitwatch.tables import Col, Records

#: (layers, d_model, heads, seq, batch, vocab) on a GPU, and for the CPU smoke run.
SIZES = {"cuda": (8, 1024, 16, 1024, 8, 32768), "cpu": (2, 64, 4, 32, 2, 128)}


def _model(device: str, size: tuple) -> Decoder:
    layers, d, heads, seq, _, vocab = size
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=vocab, n_layers=layers, d_model=d, n_heads=heads,
                        max_seq_len=seq, z_loss=0.0)  # fmt: skip
    return Decoder(cfg).to(device)


def _batches(device: str, size: tuple, n: int = 4) -> list[torch.Tensor]:
    _, _, _, seq, batch, vocab = size
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


def _value(sink: MemorySink, step: int, metric: str, **labels: str) -> float:
    steps, values = sink.series(metric, **labels)
    return values[steps.index(step)] if step in steps else float("nan")


def sync_check(device: str, size: tuple) -> dict:
    """Non-reporting steps run with sync debug mode "error": any host sync raises."""
    if device != "cuda":
        return {"check": "no sync between reports", "result": "skipped (CUDA only)"}
    model = _model(device, size)
    opt = build_optimizer(model, lr=3e-4)
    monitor = Monitor(model, opt, run="sync", sink=MemorySink(), every=10)
    quiet = quiet_steps(model, opt, monitor, _batches(device, size, 1)[0], 30)
    monitor.close()
    return {"check": "no sync between reports", "result": f"{quiet} quiet steps, no sync"}


@contextlib.contextmanager
def _autocast(device: str) -> Iterator[None]:
    with torch.autocast(device, dtype=torch.bfloat16):
        yield


def _exact_max(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """max |q·k·scale| over causal (row, key) pairs, in fp32, one head at a time."""
    q, k = q.float(), k.float()
    T = q.size(2)
    seen = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    best = 0.0
    for h in range(q.size(1)):
        s = q[:, h] @ k[:, h * k.size(1) // q.size(1)].transpose(-2, -1)  # (B, T, T)
        best = max(best, float(s.abs().masked_fill(~seen, 0).amax()) * scale)
    return best


def bf16_path(device: str, size: tuple, rounds: int) -> list[dict]:
    """The attention maximum under bf16 autocast against fp32, then the overhead ratios."""
    model = _model(device, size)
    opt = build_optimizer(model, lr=3e-4)
    sink = MemorySink()
    monitor = Monitor(model, opt, run="bf16", sink=sink, config=MonitorConfig(every=1))
    grabbed: dict[str, tuple] = {}
    attn = model.blocks[0].attn
    attn.qk_hook.register_forward_hook(lambda m, a, o: grabbed.__setitem__("qk", a))
    batch = _batches(device, size, 1)[0]
    for step in range(3):
        with _autocast(device):
            ce, _ = loss_fn(model(batch), batch, z_loss=0.0)
        ce.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        monitor.step(step, loss=ce.detach())
    monitor.close()
    q, k = (t.detach() for t in grabbed["qk"])
    exact = _exact_max(q, k, attn.scale)
    # Per head by default: the layer's maximum is the largest head's.
    logged = sink.keys()
    heads = [dict(labels) for name, labels in logged if name == "attn.logit_max"]
    reported = max(
        (_value(sink, 2, "attn.logit_max", **h) for h in heads if h["layer"] == "0"),
        default=float("nan"),
    )
    rel = abs(reported - exact) / max(exact, 1e-30)
    out = [{"check": f"bf16 attention max, layer 0 ({q.dtype})",
            "result": f"reported {reported:.5g}, exact {exact:.5g}, rel. diff {rel:.2e}",
            "ok": rel <= 2.0**-7}]  # fmt: skip
    return out + _overhead(device, size, rounds)


def _overhead(device: str, size: tuple, rounds: int) -> list[dict]:
    """Step time of no monitor / every=1 / every=10 under bf16 autocast, interleaved."""
    arms = {}
    for every in (None, 1, 10):
        model = _model(device, size)
        opt = build_optimizer(model, lr=3e-4)
        cfg = MonitorConfig(every=every or 1)
        monitor = (
            None
            if every is None
            else Monitor(model, opt, run=f"t{every}", sink=MemorySink(), config=cfg)
        )
        arms[every] = (model, opt, monitor, [])
    batches = _batches(device, size)
    warmup = 5
    for step in range(warmup + 10 * rounds):
        for model, opt, monitor, times in arms.values():
            start = torch.cuda.Event(enable_timing=True) if device == "cuda" else None
            end = torch.cuda.Event(enable_timing=True) if device == "cuda" else None
            t0 = time.perf_counter()
            if start is not None:
                start.record()
            batch = batches[step % len(batches)]
            with _autocast(device):
                ce, _ = loss_fn(model(batch), batch, z_loss=0.0)
            ce.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if monitor is not None:
                monitor.step(step, loss=ce.detach())
            if end is not None:
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                elapsed = time.perf_counter() - t0
            if step >= warmup:
                times.append(elapsed)
    for _, _, monitor, _ in arms.values():
        if monitor is not None:
            monitor.close()
    base = arms[None][3]
    rows = []
    for every, target in ((1, 1.03), (10, 1.01)):
        times = arms[every][3]
        ratio = paired_ratio(times, base)
        rows.append({"check": f"bf16 step time, every={every} / no monitor",
                     "result": f"{ratio:.4f} (median {1e3 * statistics.median(times):.2f} ms, "
                               f"no monitor {1e3 * statistics.median(base):.2f} ms)",
                     "ok": ratio <= target})  # fmt: skip
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2(device: str, size: tuple) -> list[dict]:
    """fully_shard on one rank: reported norms against the unsharded twin."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        sharded, plain = _model(device, size), _model(device, size)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        sink = MemorySink()
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
        twin_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
        monitor = Monitor(sharded, opt, run="fsdp", sink=sink,
                          config=MonitorConfig(every=1, param_every=1))  # fmt: skip
        want = []
        for step, batch in enumerate(_batches(device, size, 3)):
            for model, o in ((sharded, opt), (plain, twin_opt)):
                ce, _ = loss_fn(model(batch), batch, z_loss=0.0)
                ce.backward()
                if model is plain:
                    grads = [p.grad for p in plain.parameters()]
                    want.append(float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(g.float()) for g in grads]))))  # fmt: skip
                o.step()
                o.zero_grad(set_to_none=True)
                if model is sharded:
                    monitor.step(step, loss=ce.detach())
        monitor.close()
        got = [_value(sink, s, "grad.norm") for s in range(len(want))]
        rel = max(abs(g - w) / w for g, w in zip(got, want, strict=True))
        return [{"check": f"FSDP2 (1 rank, {backend}): grad norm vs unsharded",
                 "result": f"max rel. diff {rel:.2e} over {len(want)} steps",
                 "ok": rel <= 1e-4}]  # fmt: skip
    finally:
        dist.destroy_process_group()


def table(rows: list[dict]) -> Records:
    t = Records([Col("check", readable=24), Col("result", readable=30), "ok"], title="GPU checks")
    for r in rows:
        t.add_row(r["check"], r["result"], {True: "yes", False: "NO"}.get(r.get("ok"), ""))
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rounds", type=int, default=4, help="rounds of 10 steps per timed arm")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    console = Console()
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("no CUDA device here: run on a GPU machine, or --device cpu for a smoke run")
        return 2
    size = SIZES[args.device]
    rows = [sync_check(args.device, size)]
    rows += bf16_path(args.device, size, args.rounds)
    rows += fsdp2(args.device, size)
    console.print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
