"""What every benchmark script shares: where results go and what they record.

A run writes one JSON file, ``benchmarks/results/<benchmark>-<machine>.json``, that
replaces the last run of the same benchmark on the same kind of machine (earlier
runs stay in git's history). Its ``run`` block names the machine, the date, the git
commit and the exact command, so the results page can say where each number is from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# Models the benchmarks build (random weights, offline); git ignores this folder.
MODELS = REPO / "benchmarks" / ".models"


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from ``/proc/cpuinfo`` (Linux)."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def cpu_name() -> str:
    return _cpuinfo()[0]


def machine_slug() -> str:
    """A short, stable name for the kind of CPU: vendor and family, then the widest
    matrix instructions it has, e.g. ``intel-xeon-amx``, ``amd-epyc-avx512bf16``."""
    name, flags = _cpuinfo()
    name = re.sub(r"\((R|TM|tm)\)|\bCPU\b|\bProcessor\b|@.*$", " ", name)
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    family = "-".join(words[:2]) or platform.machine().lower()
    if "amx_bf16" in flags or "amx_tile" in flags:
        isa = "amx"
    elif "avx512_bf16" in flags:
        isa = "avx512bf16"
    elif "avx512f" in flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    else:
        isa = ""
    return f"{family}-{isa}" if isa else family


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return out.stdout.strip()


def command_line() -> str:
    """The command as typed from the repository root (``PYTHONPATH=src`` where set)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = sys.argv[0]
    prefix = ""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if any(Path(p).resolve() == REPO / "src" for p in paths):
        prefix = "PYTHONPATH=src "
    return prefix + shlex.join(["python", script_text, *sys.argv[1:]])


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_quiet(*, busy_below: float = 0.1, seconds: int = 2, timeout: float = 120.0) -> float:
    """Wait until the machine's CPUs were less than ``busy_below`` busy for ``seconds``
    one-second windows in a row (a server just stopped may still be exiting, its
    children too); returns the seconds waited (``timeout`` at most). Where there is
    no /proc/stat, returns at once."""
    if not Path("/proc/stat").exists():
        return 0.0
    started = time.monotonic()
    quiet = 0
    while quiet < seconds and time.monotonic() - started < timeout:
        busy, total = _cpu_times()
        time.sleep(1.0)
        busy_after, total_after = _cpu_times()
        share = (busy_after - busy) / max(total_after - total, 1)
        quiet = quiet + 1 if share < busy_below else 0
    return time.monotonic() - started


def run_info() -> dict[str, Any]:
    """Machine, date, commit and command of this run."""
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "benchmarks",
        ":(exclude)benchmarks/results",
    )
    if commit and changed:  # measured on code that differs from the commit
        commit += "+changes"
    return {
        "machine": machine_slug(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "command": command_line(),
    }


def add_output_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--out`` (alias ``--json``) and ``--smoke``."""
    parser.add_argument(
        "--out",
        "--json",
        dest="out",
        type=Path,
        default=None,
        help=f"results file (default: benchmarks/results/{benchmark}-<machine>.json; "
        "with --smoke: none)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one quick pass on a tiny model, to check that the script runs; "
        "writes no results file unless --out is given",
    )


def output_path(args: argparse.Namespace, benchmark: str) -> Path | None:
    if args.out is not None:
        return Path(args.out)
    if args.smoke:
        return None
    return RESULTS / f"{benchmark}-{machine_slug()}.json"


def write(path: Path | None, report: dict[str, Any], run: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` (if any) with the ``run`` block first."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run, **report}, indent=2) + "\n")
    print(f"wrote {path}")
