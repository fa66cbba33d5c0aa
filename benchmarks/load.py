"""Fleet load: many training runs posting one 200-point report a second, from one light process.

    .venv/bin/python benchmarks/load.py            # SQLite, PostgreSQL, PostgreSQL on 2 processes
    .venv/bin/python benchmarks/load.py --quick    # the same, small and short: under a minute
    .venv/bin/python benchmarks/load.py --runs 200 --seconds 30 --only sqlite

Each setup starts ``logitwatch serve`` (a fresh SQLite file, or a fresh PostgreSQL database on
127.0.0.1:5432, dropped after; ``--processes 2`` of PostgreSQL splits the runs between two
service processes) and measures, from this one process (asyncio, keep-alive connections,
requests built before the clock starts: a template batch per run, encoded once with
logitwatch.protocol, whose step, time, values and seq bytes are patched in place; the
values are each series' healthy level with step-to-step noise, NOISE):

- capacity: --connections clients post back to back for --capacity-s; requests/s, points/s
  and the server's CPU per request (utime + stime from /proc/PID/stat);
- the paced fleet: --runs runs x --series series, one step a second each, staggered over the
  second, for --seconds; latency p50/p99 from each request's scheduled time to its answer
  (and p99 from step STEADY_AFTER_S on, past the runs' first reports),
  points sent and stored (read back from the database), and for every 50th run a NaN loss
  half-way: the delay until the ``nonfinite`` alert is visible through GET /api/v1/alerts and
  until an ingest answer of that run carries it; and every alert of a run that sent no NaN
  (a false alarm on a healthy run: there must be none);
- the real agent: --agent-runs HttpSink senders (agent/transport) at one step a second, among
  the fleet; points sent and stored, what their spools hold at close (then delivered with
  ``logitwatch sync`` and counted again), latency as the sender sees it;
- the service's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psycopg
from rich.console import Console
from sqlalchemy import create_engine, inspect, text

from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.protocol import Batch, Series, encode_batch
from logitwatch.tables import Col, Records, num

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TICK = os.sysconf("SC_CLK_TCK")
NAN_EVERY = 50  # every 50th fleet run logs a NaN loss half-way
REQUEST_TIMEOUT_S = 60.0  # an answer slower than this counts as an error
BEHIND_S = 30.0  # a fleet run this far behind its schedule skips steps: the phase ends
#: The fleet's steady p99 counts the steps from this one on: every run's first report makes
#: its ~200 series (several ms each), and 500 of them in the first second queue the rest.
STEADY_AFTER_S = 10


# -- the shape of a report: what the agent sends for a 12-layer, 12-head decoder -----------


def report_series(n: int, layers: int = 12, heads: int = 12) -> list[tuple[str, dict, float]]:
    """(metric, labels, a healthy value) of the first n series of one step's report."""
    out = [("loss", {}, 3.0), ("loss.ce", {}, 2.99), ("lr", {"group": "0"}, 3e-4),
           ("logits.max_abs", {}, 24.0), ("logz.mean", {}, 4.1), ("grad.norm", {}, 0.8),
           ("param.norm", {}, 310.0), ("throughput.tokens_per_s", {}, 52_000.0)]  # fmt: skip
    for layer in range(layers):
        lab = {"layer": str(layer)}
        out += [("grad.norm", lab, 0.1), ("attn.entropy_min", lab, 1.9), ("act.rms", lab, 1.2),
                ("update.ratio", lab, 1e-3)]  # fmt: skip
    for layer in range(layers):
        for head in range(heads):
            out.append(("attn.logit_max", {"layer": str(layer), "head": str(head)}, 12.0))
    while len(out) < n:  # wider than a 12x12 model: more heads
        i = len(out)
        out.append(("attn.logit_max", {"layer": str(i // heads), "head": str(i % heads)}, 12.0))
    return out[:n]


# Sentinels: 8-byte patterns found once in the encoded template, then overwritten per request.
_SEQ = 2**62 - 12_345  # msgpack writes it as uint64 (0xcf + 8 bytes big-endian)
_STEP = 0x1234_5678_9ABC_DEF  # little-endian int64 inside each series' packed steps
_TIME = 1_234_567.890_123_456_7
_VALUE = 1.234_567_890_123e300  # series i's value is _VALUE + i * _VALUE_GAP: one pattern each
_VALUE_GAP = 1e288

#: Each metric's step-to-step noise, relative to its level. A report of a healthy run is not
#: the same numbers every step: the growth rules' windows and the spike rules' statistics
#: move with them (constant values kept every window at one point, and cost 5-17 % less
#: server CPU than these in three pairs, measured).
NOISE = {"loss": 0.01, "loss.ce": 0.01, "lr": 0.0, "logits.max_abs": 0.02, "logz.mean": 0.01,
         "grad.norm": 0.1, "param.norm": 0.0005, "throughput.tokens_per_s": 0.02,
         "attn.entropy_min": 0.02, "act.rms": 0.01, "update.ratio": 0.1,
         "attn.logit_max": 0.03}  # fmt: skip
#: Series the agent takes from the host as Python floats; it computes every other one on the
#: device and reads it back from a float32 buffer, so those values are float32 numbers.
HOST = frozenset(("lr", "throughput.tokens_per_s"))


class Template:
    """One run's report, encoded once; ``body(seq, step, time, values)`` patches a copy.

    ``levels(seed)``: each series' healthy level (heads and layers differ, by up to ±30 %);
    ``values(levels, rng)``: one step's values around them (NOISE), float32 numbers where
    the agent's are (HOST)."""

    def __init__(self, client: str, series: int) -> None:
        rows = report_series(series)
        batch = Batch(client, _SEQ, 0, [
            Series(m, lab, array("q", [_STEP]), array("d", [_VALUE + i * _VALUE_GAP]),
                   array("d", [_TIME])) for i, (m, lab, _) in enumerate(rows)])  # fmt: skip
        self.raw = np.frombuffer(encode_batch(batch), dtype=np.uint8)
        self.points = len(rows)
        self._base = np.array([v for _, _, v in rows])
        self._noise = np.array([NOISE.get(m, 0.02) for m, _, _ in rows])
        self._device = np.array([m not in HOST for m, _, _ in rows])
        self._seq = self._find(b"\xcf" + struct.pack(">Q", _SEQ), 1)[0] + 1
        self._steps = self._rows(struct.pack("<q", _STEP), len(rows))
        self._times = self._rows(struct.pack("<d", _TIME), len(rows))
        self._values = np.concatenate([
            self._rows(struct.pack("<d", _VALUE + i * _VALUE_GAP), 1) for i in range(len(rows))])  # fmt: skip

    def levels(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        spread = np.where(self._noise > 0, rng.uniform(0.7, 1.3, len(self._base)), 1.0)
        return self._base * spread

    def values(self, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        v = levels * (1.0 + self._noise * rng.standard_normal(len(levels)))
        return np.where(self._device, v.astype(np.float32), v)

    def _find(self, pattern: bytes, count: int) -> list[int]:
        data, at, found = self.raw.tobytes(), 0, []
        while (at := data.find(pattern, at)) >= 0:
            found.append(at)
            at += 1
        if len(found) != count:
            raise RuntimeError(f"template: {len(found)} copies of a sentinel, expected {count}")
        return found

    def _rows(self, pattern: bytes, count: int) -> np.ndarray:
        return np.array(self._find(pattern, count))[:, None] + np.arange(8)

    def body(self, seq: int, step: int, t: float, values: np.ndarray) -> bytes:
        buf = self.raw.copy()
        buf[self._seq : self._seq + 8] = np.frombuffer(struct.pack(">Q", seq), np.uint8)
        buf[self._steps] = np.frombuffer(struct.pack("<q", step), np.uint8)
        buf[self._times] = np.frombuffer(struct.pack("<d", t), np.uint8)
        buf[self._values] = np.ascontiguousarray(values, "<f8").view(np.uint8).reshape(-1, 8)
        return buf.tobytes()


# -- a minimal keep-alive HTTP/1.1 client: a few microseconds of Python per request ----------


class Conn:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: "
                f"application/msgpack\r\ncontent-length: {len(body)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + body)
        try:
            return await asyncio.wait_for(self._answer(), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise

    async def _answer(self) -> tuple[int, bytes]:
        lines = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in lines.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(lines[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -- services and databases -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def database(kind: str, tmp: Path, prefix: str = "lw_load"):
    """A SQLite file in ``tmp``, or a fresh PostgreSQL database dropped afterwards: its URL."""
    if kind.lower() == "sqlite":
        yield f"sqlite:///{tmp / (prefix + '.db')}"
        return
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def services(db_url: str, n: int, tmp: Path):
    """n ``logitwatch serve`` processes on one database: (urls, pids)."""
    procs, urls = [], []
    try:
        for i in range(n):
            port = _free_port()
            cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", db_url, "--port", str(port)]
            with open(tmp / f"serve{i}.log", "wb") as log:  # the child keeps its own descriptor
                env = {**os.environ, "LOGITWATCH_HOME": str(tmp)}
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
            _wait_ready(urls[-1], procs[-1], tmp / f"serve{i}.log")  # the first one migrates
        yield urls, [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"logitwatch serve exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in 120 s")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICK


def peak_rss_mb(pids: list[int]) -> float:
    kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                kb += int(line.split()[1])
    return kb / 1024


def stored_points(db_url: str, prefix: str) -> int:
    """Points in the chunks and reports of runs named prefix*: what a read gives back (a
    report holds one point of each of its series until the compactor makes chunks of it).
    One statement, so one snapshot: the compactor, still running, may turn reports into
    chunks between two."""
    engine = create_engine(db_url)
    chunks = ("SELECT COALESCE(SUM(c.n), 0) FROM chunks c JOIN series s ON s.id = c.series_id "
              "JOIN runs r ON r.id = s.run_id WHERE r.name LIKE :p")  # fmt: skip
    reports = ("SELECT COALESCE(SUM(p.n), 0) FROM reports p JOIN runs r ON r.id = p.run_id "
               "WHERE r.name LIKE :p")  # fmt: skip
    try:
        with engine.connect() as conn:
            both = (
                f"SELECT ({chunks}) + ({reports})" if inspect(conn).has_table("reports") else chunks
            )
            return int(conn.execute(text(both), {"p": prefix + "%"}).scalar())
    finally:
        engine.dispose()


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- the three measurements ---------------------------------------------------------------------


async def capacity(urls: list[str], pids: list[int], connections: int, seconds: float,
                   series: int) -> dict:  # fmt: skip
    """Back-to-back posts from `connections` clients: what the service can take."""
    templates = [Template(f"cap-{i}", series) for i in range(connections)]
    levels = [t.levels(i) for i, t in enumerate(templates)]
    rng = np.random.default_rng(0)
    conns = [Conn(urls[i % len(urls)]) for i in range(connections)]
    steps = [0] * connections
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def post(i: int) -> None:
        values = templates[i].values(levels[i], rng)
        body = templates[i].body(steps[i], steps[i], time.time(), values)
        t0 = time.perf_counter()
        try:
            status, _ = await conns[i].request("POST", f"/api/v1/runs/cap-{i}/points", body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            status = 0  # no answer: an error
        latencies.append(time.perf_counter() - t0)
        codes[status] = codes.get(status, 0) + 1
        steps[i] += 1

    await asyncio.gather(*(post(i) for i in range(connections)))  # runs and series made
    latencies.clear()
    codes.clear()

    async def client(i: int, stop: float) -> None:
        while time.monotonic() < stop:
            await post(i)

    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    await asyncio.gather(*(client(i, t0 + seconds) for i in range(connections)))
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(pids) - cpu0
    for c in conns:
        c.close()
    ok = codes.get(200, 0)
    return {
        "rps": ok / elapsed,
        "pps": ok * templates[0].points / elapsed,
        "cpu_ms": 1000 * cpu / max(ok, 1),
        "p50_ms": 1000 * _pct(latencies, 0.5),
        "p99_ms": 1000 * _pct(latencies, 0.99),
        "errors": sum(n for c, n in codes.items() if c != 200),
    }


@dataclass
class FleetResult:
    sent: int = 0
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    #: Latencies of the steps after the first STEADY_AFTER_S: past the runs' first reports.
    steady: list[float] = field(default_factory=list)
    errors: int = 0
    nan_sent: dict[int, float] = field(default_factory=dict)
    in_answer: dict[int, float] = field(default_factory=dict)
    in_api: dict[int, float] = field(default_factory=dict)
    #: (run, rule) of every alert the API showed on a run that never sent a NaN: healthy
    #: runs, so each one is a false alarm.
    false_alarms: set[tuple[int, str]] = field(default_factory=set)
    wall_s: float = 0.0  # first send to last answer
    skipped: int = 0  # points of steps not sent: their run was over BEHIND_S behind


async def fleet(urls: list[str], runs: int, series: int, seconds: int) -> FleetResult:
    """`runs` runs, one report a second each, staggered over the second."""
    templates = [Template(f"fleet-{r}", series) for r in range(runs)]
    levels = [t.levels(r) for r, t in enumerate(templates)]
    rng = np.random.default_rng(1)
    nan_runs, nan_step = set(range(0, runs, NAN_EVERY)), seconds // 2
    out = FleetResult()
    start = time.monotonic() + 1.0
    done = asyncio.Event()

    async def run(r: int) -> None:
        conn = Conn(urls[r % len(urls)])
        for step in range(seconds):
            due = start + step + r / runs
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            nan = r in nan_runs and step == nan_step
            if time.monotonic() - due > BEHIND_S and not nan:
                out.skipped += templates[r].points
                continue
            values = templates[r].values(levels[r], rng)
            if nan:
                values[0] = float("nan")  # the loss
            body = templates[r].body(step, step, time.time(), values)
            if nan:
                out.nan_sent[r] = due
            out.sent += templates[r].points
            try:
                status, answer = await conn.request("POST", f"/api/v1/runs/fleet-{r}/points", body)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                out.errors += 1
                continue
            now = time.monotonic()
            out.latencies.append(now - due)
            if step >= STEADY_AFTER_S:
                out.steady.append(now - due)
            if status != 200:
                out.errors += 1
                continue
            out.delivered += templates[r].points
            if r in out.nan_sent and r not in out.in_answer and b"nonfinite" in answer:
                out.in_answer[r] = now - out.nan_sent[r]
        conn.close()

    async def watch_alerts() -> None:
        """One poller, ten times a second: when each NaN run's alert shows in the API."""
        conn = Conn(urls[0])
        while not done.is_set() or len(out.in_api) < len(out.nan_sent):
            try:
                status, body = await conn.request("GET", "/api/v1/alerts?limit=10000")
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                status = 0
            now = time.monotonic()
            if status == 200:
                for a in json.loads(body)["alerts"]:
                    r = int(a["run"].split("-")[1]) if a["run"].startswith("fleet-") else -1
                    if a["rule"] == "nonfinite" and r in out.nan_sent and r not in out.in_api:
                        out.in_api[r] = now - out.nan_sent[r]
                    elif r >= 0 and r not in nan_runs:
                        out.false_alarms.add((r, a["rule"]))
            if done.is_set() and time.monotonic() > start + seconds + 30:
                break  # an alert that never came: reported as missing
            await asyncio.sleep(0.1)
        conn.close()

    watcher = asyncio.create_task(watch_alerts())
    await asyncio.gather(*(run(r) for r in range(runs)))
    out.wall_s = time.monotonic() - start
    done.set()
    await watcher
    return out


def agent(urls: list[str], runs: int, series: int, seconds: int, spool: Path) -> dict:
    """`runs` real HttpSink senders (agent/transport), one step a second each, in threads."""
    keys = [(m, tuple(sorted(lab.items()))) for m, lab, _ in report_series(series)]
    values = [v for _, _, v in report_series(series)]
    latencies: list[float] = []
    results: list[dict] = []

    def one(r: int) -> None:
        sink = HttpSink(urls[r % len(urls)], f"agent-{r}", spool_dir=spool / f"agent-{r}",
                        config=SenderConfig(batch_interval_s=1.0))  # fmt: skip

        def on_request(request):
            request.extensions["t0"] = time.perf_counter()

        def on_response(response):
            if response.request.url.path.endswith("/points"):
                latencies.append(time.perf_counter() - response.request.extensions["t0"])

        sink._poster.client.event_hooks = {"request": [on_request], "response": [on_response]}
        start = time.monotonic()
        for step in range(seconds):
            sink.log(step, dict(zip(keys, values, strict=True)))
            time.sleep(max(0.0, start + step + 1 - time.monotonic()))
        sink.close(timeout=60)
        results.append({"sent": seconds * len(keys), "pending": sink.spool.pending(),
                        "troubles": sum(sink.once.counts.values())})  # fmt: skip

    threads = [threading.Thread(target=one, args=(r,)) for r in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "sent": sum(r["sent"] for r in results),
        "pending": sum(r["pending"] for r in results),
        "troubles": sum(r["troubles"] for r in results),
        "p50_ms": 1000 * _pct(latencies, 0.5),
        "p99_ms": 1000 * _pct(latencies, 0.99),
        "requests": len(latencies),
    }


# -- one setup, and the report ----------------------------------------------------------------


def run_setup(kind: str, processes: int, args, console: Console) -> dict:
    label = f"{'SQLite' if kind == 'sqlite' else 'PostgreSQL'}{' ×2' if processes > 1 else ''}"
    runs = args.runs * processes  # two processes take twice the fleet
    t0 = time.monotonic()

    def say(what: str) -> None:
        console.print(f"[{time.monotonic() - t0:5.1f} s] {label}: {what}", markup=False)

    with tempfile.TemporaryDirectory(prefix="lwload-") as tmp_s:
        tmp = Path(tmp_s)
        with database(kind, tmp) as db, services(db, processes, tmp) as (urls, pids):
            say(f"capacity, {args.connections} connections, {args.capacity_s:g} s")
            cap = asyncio.run(capacity(urls, pids, args.connections, args.capacity_s, args.series))
            say(f"fleet {runs} runs x {args.series} series x {args.seconds} s, "
                f"{args.agent_runs} real agents x {args.agent_s} s")  # fmt: skip
            cpu0 = cpu_seconds(pids)
            with ThreadPoolExecutor(1) as pool:  # the real agents train among the fleet
                agents = pool.submit(
                    agent, urls, args.agent_runs, args.series, args.agent_s, tmp / "spool"
                )
                fl = asyncio.run(fleet(urls, runs, args.series, args.seconds))
                ag = agents.result()
            fleet_cpu = cpu_seconds(pids) - cpu0
            stored = stored_points(db, "fleet-")
            ag["stored_live"] = ag["stored"] = stored_points(db, "agent-")
            if ag["pending"]:  # behind at close: deliver the spools the documented way
                for d in sorted((tmp / "spool").iterdir()):
                    cmd = [sys.executable, "-m", "logitwatch", "sync", str(d), "--server", urls[0]]
                    subprocess.run(cmd, capture_output=True, timeout=600, check=False)
                ag["stored"] = stored_points(db, "agent-")
            rss = peak_rss_mb(pids)
            say("done")
    requests = len(fl.latencies)
    api, answer = list(fl.in_api.values()), list(fl.in_answer.values())
    return {
        "label": label, "cap": cap, "runs": runs,
        "delivered_rps": requests / fl.wall_s, "p50_ms": 1000 * _pct(fl.latencies, 0.5),
        "p99_ms": 1000 * _pct(fl.latencies, 0.99), "sent": fl.sent, "stored": stored,
        "steady_p99_ms": 1000 * _pct(fl.steady, 0.99),
        "skipped": fl.skipped, "fleet_cpu_ms": 1000 * fleet_cpu / max(requests + ag["requests"], 1), "errors": fl.errors,
        "nan_runs": len(fl.nan_sent), "api_p50": _pct(api, 0.5), "api_max": max(api, default=float("nan")),
        "api_seen": len(api), "answer_p50": _pct(answer, 0.5),
        "answer_max": max(answer, default=float("nan")), "answer_seen": len(answer),
        "agent": ag, "rss_mb": rss, "false_alarms": len(fl.false_alarms),
    }  # fmt: skip


def _f(x: float, digits: int = 0) -> str:
    return "—" if x != x else f"{x:,.{digits}f}"  # NaN: nothing measured


def report(results: list[dict], args, console: Console) -> bool:
    table = Records(
        [Col("measure", readable=24), *(num(r["label"]) for r in results), Col("target", readable=9)],
        title=f"Load: {args.series}-point reports (one step x {args.series} series)",
    )  # fmt: skip

    def row(name: str, cells, target: str = "") -> None:
        table.add_row(name, *cells, target)

    caps = [r["cap"] for r in results]
    agents = [r["agent"] for r in results]
    row("capacity requests/s", [_f(c["rps"]) for c in caps], "≥ 2,000")
    row("capacity points/s", [_f(c["pps"]) for c in caps], "≥ 400,000")
    row("server CPU ms/request", [_f(c["cpu_ms"], 2) for c in caps], "≤ 1, PG 2")
    row("capacity p50 ms", [_f(c["p50_ms"], 1) for c in caps])
    row("capacity p99 ms", [_f(c["p99_ms"], 1) for c in caps])
    row("fleet runs, 1 step/s", [f"{r['runs']:,}" for r in results])
    row("fleet requests/s answered", [_f(r["delivered_rps"]) for r in results], "= runs")
    row("fleet p50 ms", [_f(r["p50_ms"], 1) for r in results])
    row("fleet p99 ms", [_f(r["p99_ms"], 1) for r in results], "≤ 50")
    row(f"fleet p99 ms, steps ≥ {STEADY_AFTER_S}", [_f(r["steady_p99_ms"], 1) for r in results])
    row("fleet server CPU ms/req", [_f(r["fleet_cpu_ms"], 2) for r in results])
    row("fleet points sent", [f"{r['sent']:,}" for r in results])
    row("fleet points stored", [f"{r['stored']:,}" for r in results], "= sent")
    row(f"not sent: {BEHIND_S:g} s behind", [f"{r['skipped']:,}" for r in results], "0")
    row("NaN→alert, API, p50 s", [_f(r["api_p50"], 2) for r in results])
    row("NaN→alert, API, max s", [_f(r["api_max"], 2) for r in results], "≤ 1")
    row("NaN→alert, answer, p50 s", [_f(r["answer_p50"], 2) for r in results])
    row("NaN→alert, answer, max s", [_f(r["answer_max"], 2) for r in results], "≤ 1")
    row("NaN runs seen: API", [f"{r['api_seen']}/{r['nan_runs']}" for r in results], "all")
    row("NaN runs seen: answer", [f"{r['answer_seen']}/{r['nan_runs']}" for r in results], "all")
    row("alerts on healthy runs", [f"{r['false_alarms']:,}" for r in results], "0")
    row("errors", [f"{r['errors'] + r['cap']['errors']:,}" for r in results], "0")
    row("agent points sent", [f"{a['sent']:,}" for a in agents])
    row("agent points stored live", [f"{a['stored_live']:,}" for a in agents], "= sent")
    row("agent batches left in spool", [f"{a['pending']:,}" for a in agents], "0")
    row("agent stored after sync", [f"{a['stored']:,}" for a in agents], "= sent")
    row("agent p50 ms", [_f(a["p50_ms"], 1) for a in agents])
    row("agent p99 ms", [_f(a["p99_ms"], 1) for a in agents])
    row("service peak RSS MB", [_f(r["rss_mb"]) for r in results])
    console.print(table)
    ok = all(r["sent"] == r["stored"] and r["agent"]["sent"] == r["agent"]["stored"]
             and not r["errors"] and not r["false_alarms"] for r in results)  # fmt: skip
    live = all(not r["skipped"] and r["api_seen"] == r["answer_seen"] == r["nan_runs"]
               and r["agent"]["stored_live"] == r["agent"]["sent"] for r in results)  # fmt: skip
    console.print("OK: every point sent was stored, no errors, no false alarms" if ok
                  else "FAILED: points missing, requests failed or healthy runs alerted")  # fmt: skip
    if not live:
        console.print("BEHIND: not held live (a fleet over 30 s behind, an agent left points in "
                      "its spool, or a NaN's alert never came)")  # fmt: skip
    return ok and live


SETUPS = {
    "sqlite": ("sqlite", 1),
    "postgresql": ("postgresql", 1),
    "postgresql-x2": ("postgresql", 2),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small and short: under a minute")
    p.add_argument("--runs", type=int, default=500, help="fleet runs per service process")
    p.add_argument("--series", type=int, default=200, help="series per run (points per report)")
    p.add_argument("--seconds", type=int, default=60, help="fleet duration (steps per run)")
    p.add_argument("--connections", type=int, default=16, help="capacity clients")
    p.add_argument("--capacity-s", type=float, default=20.0, help="capacity duration")
    p.add_argument("--agent-runs", type=int, default=4, help="real HttpSink senders")
    p.add_argument("--agent-s", type=int, default=20, help="real agents' steps (one a second)")
    p.add_argument("--only", choices=sorted(SETUPS), action="append", help="setups to run")
    args = p.parse_args()
    if args.quick:
        args.runs, args.seconds, args.capacity_s = 20, 5, 2.0
        args.agent_runs, args.agent_s = 1, 3
    console = Console()
    console.print(f"load: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    results = [run_setup(*SETUPS[name], args, console)
               for name in (args.only or list(SETUPS))]  # fmt: skip
    return 0 if report(results, args, console) else 1


if __name__ == "__main__":
    sys.exit(main())
