"""Is a change faster? This checkout against another revision, alternating, in one run.

This machine's numbers drift by ±10–15% between runs, so a change is judged only against its base
measured in the same run: for each round and connection count, `scripts/bench/proxy.py`
(spendledger only: no LiteLLM, no profile, docs untouched) runs once from a worktree of `--base`
and once from this checkout, alternating. Prints every run and the means; writes nothing.

    .venv/bin/python scripts/bench/compare.py --base main [--rounds 3] [--duration 10] [--connections 1 64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A run's row in proxy.py's "Every run" table: | # | target | conns | requests | req/s | p50 | p99 | …
_ROW = re.compile(r"^\| \d+ \| spendledger \| (\d+) \| [\d,]+ \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|", re.M)


@dataclass(frozen=True)
class Result:
    side: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float


def parse(side: str, output: str) -> Result:
    """The spendledger run in a proxy.py output (one round, one connection count)."""
    found = _ROW.search(output)
    if found is None:
        raise SystemExit(f"{side}: no spendledger run in proxy.py's output:\n{output[-2000:]}")
    conns, rps, p50, p99 = found.groups()
    return Result(side, int(conns), float(rps.replace(",", "")), float(p50), float(p99))


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sl-bench-base-", dir="/tmp"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), revision], cwd=PROJECT_ROOT,
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=PROJECT_ROOT, check=False)


def run(side: str, checkout: Path, connections: int, duration: float) -> Result:
    """proxy.py from `checkout`, its own code first on the path (the server runs `python -m spendledger.api`)."""
    argv = [sys.executable, str(checkout / "scripts" / "bench" / "proxy.py"), "--skip-litellm", "--no-profile",
            "--no-doc", "--rounds", "1", "--warmup", "3", "--duration", f"{duration:g}",
            "--connections", str(connections)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side}: proxy.py failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = parse(side, done.stdout)
    print(f"{side:>4} c{connections:<3} {result.rps:8,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
          f"p99 {result.p99_ms:7.2f} ms", flush=True)  # fmt: skip
    return result


def summary(results: list[Result]) -> str:
    lines = ["| conns | side | req/s (runs) | mean req/s | p50 ms (runs) | mean p50 ms |", "|---|---|---|---|---|---|"]
    for conns in dict.fromkeys(r.connections for r in results):
        for side in ("base", "this"):
            mine = [r for r in results if r.side == side and r.connections == conns]
            rps = [r.rps for r in mine]
            p50 = [r.p50_ms for r in mine]
            lines.append(
                f"| {conns} | {side} | {', '.join(f'{v:,.0f}' for v in rps)} | {sum(rps) / len(rps):,.0f} "
                f"| {', '.join(f'{v:.2f}' for v in p50)} | {sum(p50) / len(p50):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the revision to compare against (a branch, tag or sha)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    results: list[Result] = []
    with worktree(args.base) as base:
        for _ in range(args.rounds):
            for conns in args.connections:
                results.append(run("base", base, conns, args.duration))
                results.append(run("this", PROJECT_ROOT, conns, args.duration))
    print(summary(results))


if __name__ == "__main__":
    main()
