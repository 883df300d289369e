"""The benchmark harness: ceiling probes, entry families, one table.

    python -m benchmarks [names...] [--repeats N] [--quick] [--no-peers] [--json PATH]

Every entry family is a module with `run(ctx) -> list[Row]`. A row is either ours or a peer's;
rows of the same op, shape, dtype and mode are compared: ratio = peer_ms / our_ms, so > 1 means
memzoo is faster. Each row's throughput is also given as a fraction of a ceiling this machine is
measured at when the harness starts, because absolute times on a shared 2-core CPU mean little
from one machine to the next.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import platform
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from benchmarks import _timing

# Entry families, by the name given on the command line; each maps to benchmarks/<module>.py.
FAMILIES = {
    "linear_scan": "benchmarks.linear_scan",
    "chunked_linear_attention": "benchmarks.chunked_linear_attention",
    "delta_rule": "benchmarks.delta_rule",
    "dplr_delta_rule": "benchmarks.dplr_delta_rule",
    "rwkv6": "benchmarks.rwkv6",
    "selective_scan": "benchmarks.selective_scan",
    "memory_lookup": "benchmarks.memory_lookup",
    "ssd": "benchmarks.ssd",
    "ssm_layers": "benchmarks.ssm_layers",
    "train": "benchmarks.train",
    "titans": "benchmarks.titans",
}

COLUMNS = ("op", "shape", "dtype", "implementation", "mode", "median ms", "throughput",
           "% ceiling", "vs peers (peer ms / our ms) / notes")


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    implementation: str
    mode: str
    ms: float | None  # None: not measured (skipped or peer unavailable); `note` says why
    role: str = "ours"  # "ours" | "peer" | "probe"
    peer: str = ""  # a peer's short name, used in the ratio column of our rows
    bytes_moved: float | None = None
    flops: float | None = None
    tokens: int | None = None
    ceiling: str | None = None  # which probe the row is a fraction of
    note: str = ""
    ratios: dict = dataclasses.field(default_factory=dict)

    @property
    def gbps(self):
        return None if self.ms is None or self.bytes_moved is None else (
            self.bytes_moved / self.ms / 1e6)

    @property
    def gflops(self):
        return None if self.ms is None or self.flops is None else self.flops / self.ms / 1e6

    @property
    def tokens_per_s(self):
        return None if self.ms is None or self.tokens is None else self.tokens / self.ms * 1e3

    def key(self):
        return (self.op, self.shape, self.dtype, self.mode)


@dataclasses.dataclass
class Context:
    quick: bool
    repeats: int
    warmup: int
    peers: bool
    log: Callable[[str], None]
    probes: dict = dataclasses.field(default_factory=dict)  # probe name -> throughput
    budget_s: float = 20.0  # a first call slower than this is timed once (see _timing)
    last_note: str = ""

    def time(self, step) -> float:
        """Median ms of `step`; `last_note` says when the budget cut the repeats."""
        result = _timing.time_calls(step, repeats=self.repeats, warmup=self.warmup,
                                    budget_s=self.budget_s)
        self.last_note = ("timed once, compile included: first call over "
                          f"{self.budget_s:.0f} s" if result["repeats"] == 0 else "")
        return result["median_ms"]


# ---------------------------------------------------------------------------------------------
# Ceilings


def measure_probes(ctx: Context) -> list[Row]:
    """GEMM GFLOP/s and elementwise read+write GB/s, fresh output and donated output.

    Both read+write variants are kept: on the development CPU a fresh 128 MiB output costs page
    faults worth several times the arithmetic (about 7.5 GB/s fresh against 43 GB/s donated), so
    an op that writes a fresh output is held to the fresh ceiling and a donated one to the other.
    """
    n = 512 if ctx.quick else 2048
    elems = (8 if ctx.quick else 128) * 2**20 // 4
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.float32)
    y = jax.random.normal(ky, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    rows = [Row("probe: GEMM jnp.dot", f"{n}x{n} @ {n}x{n}", "float32", "xla", "fresh",
                ctx.time(_timing.fresh_step(dot, x, y)), role="probe", flops=2.0 * n**3)]

    u = jnp.full((elems,), 1.0, jnp.float32)
    v = jnp.full((elems,), 0.5, jnp.float32)
    axpy = lambda x, z: 2 * x + z  # noqa: E731
    fresh = jax.jit(axpy)
    # Donating z and feeding y back as z keeps values growing only linearly across repeats.
    donated = jax.jit(axpy, donate_argnums=1)
    rw_bytes = 3.0 * elems * 4
    shape = f"{elems * 4 // 2**20} MiB x3"
    rows.append(Row("probe: y = 2x + z", shape, "float32", "xla", "fresh",
                    ctx.time(_timing.fresh_step(fresh, u, v)), role="probe",
                    bytes_moved=rw_bytes))
    rows.append(Row("probe: y = 2x + z", shape, "float32", "xla", "donated",
                    ctx.time(_timing.donated_step(donated, (u, jnp.copy(v)), 1,
                                                  feed=lambda out: out)),
                    role="probe", bytes_moved=rw_bytes))
    ctx.probes = {"gemm": rows[0].gflops, "rw fresh": rows[1].gbps, "rw donated": rows[2].gbps}
    for r in rows:
        r.ceiling = "gemm" if r.flops else f"rw {r.mode}"
    return rows


# ---------------------------------------------------------------------------------------------
# Table


def compare(rows: list[Row]) -> None:
    """Fills each of our rows' ratios with every peer row of the same op, shape, dtype, mode."""
    for ours in rows:
        if ours.role != "ours" or ours.ms is None:
            continue
        for peer in rows:
            if peer.role == "peer" and peer.key() == ours.key():
                ours.ratios[peer.peer] = None if peer.ms is None else peer.ms / ours.ms


def _fmt_ms(ms):
    if ms is None:
        return "n/a"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_throughput(row: Row):
    if row.gflops is not None:
        return f"{row.gflops:.1f} GFLOP/s"
    if row.gbps is not None:
        return f"{row.gbps:.2f} GB/s"
    if row.tokens_per_s is not None:
        return f"{row.tokens_per_s / 1e3:.1f}k tok/s"
    return ""


def percent_of_ceiling(row: Row, probes: dict):
    if row.ceiling is None or row.ceiling not in probes or probes[row.ceiling] is None:
        return None
    value = row.gflops if row.ceiling == "gemm" else row.gbps
    return None if value is None else 100.0 * value / probes[row.ceiling]


def cells(row: Row, probes: dict) -> list[str]:
    pct = percent_of_ceiling(row, probes)
    # Three significant figures, so a ratio far below 1 still reads as a number, not 0.00x.
    notes = [f"{name} {'n/a' if r is None else f'{r:.3g}x'}" for name, r in row.ratios.items()]
    if row.note:
        notes.append(row.note)
    impl = row.implementation if row.role != "peer" else f"peer: {row.implementation}"
    return [row.op, row.shape, row.dtype, impl, row.mode, _fmt_ms(row.ms), _fmt_throughput(row),
            "" if pct is None else f"{pct:.0f}% {row.ceiling}", "; ".join(notes)]


def format_table(rows: list[Row], probes: dict) -> str:
    """A Markdown table, so the same text goes into RESULTS.md."""
    body = [cells(r, probes) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *body)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(cs) for cs in body])


def to_json(rows: list[Row], probes: dict, argv) -> dict:
    def one(r: Row):
        d = dataclasses.asdict(r)
        d.update(gbps=r.gbps, gflops=r.gflops, tokens_per_s=r.tokens_per_s,
                 percent_of_ceiling=percent_of_ceiling(r, probes))
        return d
    return {"argv": list(argv), "jax": jax.__version__, "backend": jax.default_backend(),
            "machine": platform.machine(), "probes": probes, "rows": [one(r) for r in rows]}


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*",
                        help=f"entry families to run (default: all): {', '.join(FAMILIES)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per entry after warm-up (default 10, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the compiling one (default 2, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--no-peers", action="store_true", help="measure memzoo's entries only")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--budget", type=float, default=20.0, metavar="SECONDS",
                        help="an entry whose first call takes longer is timed once (default 20)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown benchmark name(s) {', '.join(map(repr, unknown))}; "
                     f"known: {', '.join(FAMILIES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def run(argv=None, *, log=None) -> tuple[list[Row], dict]:
    """Runs the selected families; returns (rows, probes). The in-process API tests use."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ctx = Context(quick=args.quick,
                  repeats=args.repeats or (5 if args.quick else 10),
                  warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
                  peers=not args.no_peers, log=log, budget_s=args.budget)
    log(f"probing this machine's ceilings ({jax.default_backend()}, jax {jax.__version__})")
    rows = measure_probes(ctx)
    for name in args.names or list(FAMILIES):
        log(f"running {name}")
        rows.extend(importlib.import_module(FAMILIES[name]).run(ctx))
    compare(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, ctx.probes, argv), f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return rows, ctx.probes


def main(argv=None) -> int:
    rows, probes = run(argv)
    print(format_table(rows, probes))
    return 0
