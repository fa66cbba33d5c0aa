"""What the Monitor costs a training step: reference decoder on the CPU, with and without it.

Identical models train side by side, interleaved step by step (in a random order each step): no
monitor, a Monitor reporting every step, one reporting every 10th, and a second copy of the
model without a monitor, whose ratio is the noise floor of the run (the same work, another
copy in memory); then the same three under torch.compile (each compiled arm's ratio is to the
compiled model without a monitor; compiling happens in the warm-up steps; --no-compile leaves
these arms out). An arm's ratio is the median over rounds of 10 steps of its time in the round
over the reference arm's time in the same round: paired, so a slow spell of the machine
slows both, and every round holds one reporting step of the every=10 arm, so its ratio counts
that step's cost once per 10 steps, as training does (a median of single steps would hide
it). The rounds are split into --blocks blocks, each with fresh copies of every arm (new
models, optimizers and Monitors): where an arm's tensors land in memory moves its step time by
about 1 % for as long as they live, which interleaving cannot cancel but new copies re-draw;
the table shows each arm's ratio over the rounds of all blocks, and the lowest and highest of
the blocks' own ratios. Then a per-probe breakdown of a reporting step, then the transport
comparison of benchmarks/transport.py when it is there.

    .venv/bin/python benchmarks/agent_overhead.py [--rounds 30] [--layers 4] [--d-model 256]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch._dynamo.utils import counters

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.probes.reductions import act_rms, attn_logit_absmax, attn_stats, logits_stats
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.reference.optim import build_optimizer
from logitwatch.agent.transport.filesink import FileSink
from logitwatch.tables import Col, Records, num

ROOT = Path(__file__).resolve().parents[1]
#: The A/A arm: a second copy of the model without a monitor, against the first.
NOISE = "no monitor, 2nd copy (noise floor)"


def build(args) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=256, n_layers=args.layers, d_model=args.d_model, n_heads=args.d_model // 64,
        max_seq_len=args.seq, z_loss=1e-4,
    )  # fmt: skip
    return Decoder(cfg)


def step_fn(model, opt, monitor, batch, step: int, z_loss: float = 1e-4) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step (CPU time is steadier on a busy box)."""
    start, cpu = time.perf_counter(), time.process_time()
    ce, z = loss_fn(model(batch), batch, z_loss=z_loss)
    (ce + z).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if monitor is not None:
        monitor.step(step, loss=(ce + z).detach(), loss_z=z.detach(), tokens=batch.numel())
    return time.perf_counter() - start, time.process_time() - cpu


def overhead(args, console: Console) -> None:
    base = build(args)
    # arm -> (every, compiled, the arm its ratio is to)
    arms = {"no monitor": (None, False, "no monitor"), "every=1": (1, False, "no monitor"),
            "every=10": (10, False, "no monitor")}  # fmt: skip
    if args.compile:
        for name, (every, _, _) in list(arms.items()):
            arms[f"compiled, {name}"] = (every, True, "compiled, no monitor")
    arms[NOISE] = (None, False, "no monitor")
    tmp = tempfile.mkdtemp(prefix="logitwatch-bench-")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (args.batch, args.seq), generator=g) for _ in range(4)]
    per_block = max(1, -(-args.rounds // args.blocks))
    # arm -> [wall], [cpu], and per block the arm's paired ratios of its rounds
    times = {name: ([], [], []) for name in arms}
    graphs = {"warm-up": 0, "measured": 0}
    order = random.Random(2)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(
            f"steps ({len(arms)} arms each, {args.blocks} blocks of fresh copies)",
            total=args.blocks * (args.warmup + per_block * 10),
        )
        for block in range(args.blocks):
            # Fresh copies each block: where an arm's tensors land in memory moves its step
            # time by ~1 % for as long as they live (measured: two identical arms 0.99-1.01
            # apart in one run), and interleaving steps cannot cancel that; new copies re-draw
            # it, and the ratios pool rounds from every block.
            runs = {}
            for name, (every, compiled, _) in arms.items():
                model = copy.deepcopy(base)
                opt = build_optimizer(model, lr=3e-4)
                monitor = None
                if every is not None:
                    run = f"bench-{every}" + ("-compiled" if compiled else "") + f"-{block}"
                    sink = FileSink(tmp, run)  # the offline default sink
                    monitor = Monitor(
                        model, opt, run=run, sink=sink, config=MonitorConfig(every=every)
                    )
                # Every Monitor exists before the first compiled forward, as the README asks.
                runs[name] = (torch.compile(model) if compiled else model, opt, monitor, [], [])
            total = args.warmup + per_block * 10  # rounds of 10 steps: every=10 reports once
            for step in range(total):
                if step == args.warmup:
                    graphs["warm-up"] += counters["stats"]["unique_graphs"]
                    counters["stats"]["unique_graphs"] = 0
                # Interleaved, in a new random order each step: an arm's place in the round
                # (after which arm, in what state it left the caches and the allocator) moves
                # its step time by several percent on a 2-core box.
                arms_now = list(runs.values())
                order.shuffle(arms_now)
                for model, opt, monitor, wall, cpu in arms_now:
                    t, c = step_fn(model, opt, monitor, batches[step % len(batches)], step)
                    if step >= args.warmup:
                        wall.append(t)
                        cpu.append(c)
                progress.advance(task)
            graphs["measured"] += counters["stats"]["unique_graphs"]
            counters["stats"]["unique_graphs"] = 0
            for name, (_, _, monitor, wall, cpu) in runs.items():
                if monitor is not None:
                    monitor.close()
                ref_wall = runs[arms[name][2]][3]
                times[name][0].extend(wall)
                times[name][1].extend(cpu)
                times[name][2].append(paired_ratios(wall, ref_wall))
    title = (
        f"Step time, {args.layers} layers, d_model {args.d_model}, seq {args.seq}, "
        f"batch {args.batch} (CPU, {torch.get_num_threads()} threads, "
        f"{len(times['every=1'][0])} steps per arm in {args.blocks} blocks)"
    )
    targets = {"every=1": 1.03, "every=10": 1.01}
    rows = []
    for name, (wall, cpu, blocks) in times.items():
        ref_wall, ref_cpu = times[arms[name][2]][:2]
        ratio = statistics.median([r for b in blocks for r in b])
        cpu_ratio = statistics.median(paired_ratios(cpu, ref_cpu))
        spread = [statistics.median(b) for b in blocks]
        target = targets.get(name.removeprefix("compiled, "))
        verdict = "" if target is None else f"<= {target} {'met' if ratio <= target else 'NOT met'}"
        rows.append(
            (name, 1e3 * statistics.median(wall), ratio, verdict,
             1e3 * statistics.median(cpu), cpu_ratio, (min(spread), max(spread)))
        )  # fmt: skip
    console.print(overhead_table(title, rows))
    for prefix in ("", "compiled, ") if args.compile else ("",):
        base_ms = [statistics.median(x) for x in times[prefix + "no monitor"][:2]]
        every1 = [statistics.median(x) for x in times[prefix + "every=1"][:2]]
        console.print(
            f"{prefix or 'eager, '}every=1 costs {1e3 * (every1[0] - base_ms[0]):.1f} ms a step "
            f"(CPU {1e3 * (every1[1] - base_ms[1]):.1f} ms; the breakdown below sums its parts)"
        )
    # Reporting vs non-reporting steps of the every=10 arms: what a probe step costs on its own.
    first = (10 - args.warmup % 10) % 10
    for prefix in ("", "compiled, ") if args.compile else ("",):
        steps = times[f"{prefix}every=10"][0]
        rep = [t for i, t in enumerate(steps) if i % 10 == first]
        non = [t for i, t in enumerate(steps) if i % 10 != first]
        console.print(
            f"{prefix}every=10 arm: reporting steps median {1e3 * statistics.median(rep):.1f} ms, "
            f"other steps {1e3 * statistics.median(non):.1f} ms, "
            f"no monitor {1e3 * statistics.median(times[prefix + 'no monitor'][0]):.1f} ms"
        )
    if args.compile:
        console.print(
            f"compiled arms: {graphs['warm-up']} graphs compiled in the blocks' warm-ups, "
            f"{graphs['measured']} in measured steps (recompiles), "
            f"{sum(counters['graph_break'].values())} graph breaks"
        )


def paired_ratios(times: list[float], ref: list[float], steps: int = 10) -> list[float]:
    """Each round's (``steps`` consecutive steps) time over the reference's in that round."""
    n = min(len(times), len(ref)) // steps * steps
    return [sum(times[i : i + steps]) / sum(ref[i : i + steps]) for i in range(0, n, steps)]


def paired_ratio(times: list[float], ref: list[float], steps: int = 10) -> float:
    """Median over rounds of ``steps`` consecutive steps of sum(times) / sum(ref) in the round
    (both lists hold the same steps, interleaved in one run)."""
    return statistics.median(paired_ratios(times, ref, steps))


def breakdown(args, console: Console) -> None:
    """Time each reduction of a reporting step on the tensors a real step makes."""
    model = build(args)
    opt = build_optimizer(model, lr=3e-4)
    grabbed = {}
    model.blocks[0].attn.qk_hook.register_forward_hook(lambda m, a, o: grabbed.setdefault("qk", a))
    model.logits_hook.register_forward_hook(lambda m, a, o: grabbed.setdefault("logits", o))
    model.blocks[0].resid_hook.register_forward_hook(lambda m, a, o: grabbed.setdefault("resid", o))
    batch = torch.randint(0, 256, (args.batch, args.seq))
    ce, z = loss_fn(model(batch), batch, z_loss=1e-4)
    (ce + z).backward()
    with Monitor(
        model, opt, run="breakdown", sink=FileSink(tempfile.mkdtemp(), "breakdown")
    ) as monitor:
        params = monitor.params
        q, k = (t.detach() for t in grabbed["qk"])
        scale = model.blocks[0].attn.scale
        cfg = MonitorConfig()
        weights = [p.detach() for p in params.params]

        def moved() -> None:  # what an optimizer step does to the weights: a new version
            torch._foreach_mul_(weights, 1.0)

        kept = list(torch._foreach_norm([p.grad for p in params.params]))
        layers = args.layers
        per = 1 / cfg.weights_every  # an every=1 step reads the weights this often (default)
        # name -> (setup, untimed; the timed call; how many times an every=1 step makes it)
        cases = {
            f"attn_stats, one layer (x{layers})": (None, lambda: attn_stats(
                q, k, scale, sample_rows=cfg.sample_rows, sample_batch=cfg.sample_batch
            ), layers),
            "  of which the exact max |logit|": (None, lambda: attn_logit_absmax(q, k, scale), 0),
            "logits_stats (logits, log Z)": (
                None, lambda: logits_stats(grabbed["logits"], sample_tokens=cfg.sample_tokens), 1
            ),
            f"act_rms, one layer (x{layers})": (None, lambda: act_rms(grabbed["resid"]), layers),
            # ClippedAdamW keeps each gradient's norm (taken to clip): the Monitor groups those.
            "grad norms from the optimizer's own (global + per layer)": (
                None, lambda: params.grads(kept), 1
            ),
            "  read from the gradients (optimizers that keep none)": (None, params.grads, 0),
            # Read every param_every steps: a snapshot before the step, norms + ratio after.
            f"weights every {cfg.weights_every}: snapshot before the step": (
                lambda: (params.weights(), moved()), params.snapshot, per
            ),
            f"weights every {cfg.weights_every}: norms + ratio after it": (
                lambda: (moved(), params.snapshot(), moved()), params.weights, per
            ),
            # param_every=1: weights(keep=True) leaves the next snapshot, which copies nothing.
            "weights every step (param_every=1)": (
                lambda: (params.snapshot(), moved()), lambda: params.weights(keep=True), 0
            ),
            "device-to-host copy of the buffer": (
                None, lambda: monitor.slots.buf[: monitor.slots.used].clone(), 1
            ),
        }  # fmt: skip
        costs, total = [], [0.0, 0.0]
        with torch.no_grad():
            for name, (setup, fn, count) in cases.items():
                wall, cpu = [], []
                for _ in range(args.breakdown_reps):
                    if setup is not None:
                        setup()
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    wall.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
                ms = (1e3 * statistics.median(wall), 1e3 * statistics.median(cpu))
                costs.append((name, *ms))
                total = [t + count * m for t, m in zip(total, ms, strict=True)]
        console.print(breakdown_table(costs, args.breakdown_reps))
        console.print(
            f"breakdown summed for an every=1 reporting step (the weights read every "
            f"{cfg.weights_every}th): {total[0]:.1f} ms (CPU {total[1]:.1f} ms)"
        )


def overhead_table(
    title: str, rows: list[tuple[str, float, float, str, float, float, tuple[float, float]]]
) -> Records:
    """(arm, median ms, ratio, target verdict, CPU ms, CPU ratio, (lowest, highest) of the
    blocks' own ratios) a row."""
    table = Records(
        ["arm", num("median ms"), num("ratio"), Col("blocks", readable=13),
         Col("target", readable=14), num("CPU ms"), num("CPU ratio")],
        title=title,
    )  # fmt: skip
    for name, ms, ratio, verdict, cpu_ms, cpu_ratio, (low, high) in rows:
        table.add_row(
            name, f"{ms:,.1f}", f"{ratio:.4f}", f"{low:.3f}-{high:.3f}", verdict,
            f"{cpu_ms:,.1f}", f"{cpu_ratio:.4f}",
        )  # fmt: skip
    return table


def breakdown_table(costs: list[tuple[str, float, float]], reps: int) -> Records:
    """(probe, median ms, median CPU ms) a row."""
    table = Records(
        [Col("probe", readable=24), num("ms"), num("CPU ms")],
        title=f"Cost of each reduction on a reporting step (median of {reps})",
    )
    for name, ms, cpu_ms in costs:
        table.add_row(name, f"{ms:,.3f}", f"{cpu_ms:,.3f}")
    return table


def sync_check(args, console: Console) -> None:
    """On CUDA: raise on any host-device synchronisation during non-reporting steps."""
    if not torch.cuda.is_available():
        console.print("--sync-check needs a CUDA device")
        return
    model = build(args).cuda()
    opt = build_optimizer(model, lr=3e-4)
    sink = FileSink(tempfile.mkdtemp(), "sync-check")
    monitor = Monitor(model, opt, run="sync-check", sink=sink, every=10)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (args.batch, args.seq), generator=g).cuda()
    quiet = quiet_steps(model, opt, monitor, batch, 40)
    monitor.close()
    reported = sorted(_jsonl_steps(sink.path))
    console.print(
        f"sync check: {quiet} non-reporting CUDA steps ran under set_sync_debug_mode('error') "
        f"without a synchronisation; steps reported: {reported}"
    )


def quiet_steps(model, opt, monitor, batch: torch.Tensor, steps: int) -> int:
    """Train ``steps`` steps on CUDA, the non-reporting ones (after 3 of warm-up) under
    ``set_sync_debug_mode("error")``, so that any host synchronisation raises; returns how
    many ran so."""
    quiet = 0
    for step in range(steps):
        # z_loss=0: loss_fn's z-loss selects tokens with a boolean mask, which syncs by itself.
        mode = "error" if step >= 3 and not monitor.armed else "default"
        torch.cuda.set_sync_debug_mode(mode)
        try:
            step_fn(model, opt, monitor, batch, step, z_loss=0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        quiet += mode == "error"
    return quiet


def _jsonl_steps(path: Path) -> set[int]:
    """Steps present in a FileSink's JSON-lines file (batches are columnar per series)."""
    import json

    steps: set[int] = set()
    for line in path.read_text().splitlines():
        for series in json.loads(line).get("series", []):
            steps.update(series["steps"])
    return steps


def transports(console: Console) -> None:
    path = ROOT / "benchmarks" / "transport.py"
    if not path.exists():
        console.print("(benchmarks/transport.py not found: transport comparison skipped)")
        return
    spec = importlib.util.spec_from_file_location("logitwatch_bench_transport", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure_transports()
    console.print("Transport: handing 200 scalars per step to each logger")
    console.print(module.transport_table(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9, help="rounds of 10 interleaved steps per arm")
    p.add_argument("--blocks", type=int, default=3, help="fresh copies of every arm, rounds split")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--breakdown-reps", type=int, default=40, help="calls timed per probe")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--sync-check", action="store_true", help="CUDA: prove no sync between reports")
    p.add_argument("--no-transport", action="store_true", help="skip the transport comparison")
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile arms"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    if args.sync_check:
        sync_check(args, console)
        return 0
    overhead(args, console)
    if args.breakdown:
        breakdown(args, console)
    if not args.no_transport:
        transports(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
