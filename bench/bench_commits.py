"""The built-in model's query latency at two git revisions, side by side on this CPU.

    .venv/bin/python bench/bench_commits.py --base REV [--new REV] [--threads 1] [--repeats 30]
        [--firsts 8] [--no-append]

Absolute times on a shared machine drift by up to 1.5x within an hour, so figures taken in separate
runs cannot show what a change gained. This script checks out ``--base`` (and ``--new``, default: the
working tree) as temporary git worktrees and runs the same measurement for both **at the same time**,
each process pinned to its own core (``taskset``) with ``--threads`` torch threads: both see the same
machine state. On a machine with fewer than two cores they run one after the other.

Each process loads ``models/lisa-mobile-synth`` of *this* checkout (the same weights for both), in
``--dtype`` (auto: bf16 where the CPU has AMX / AVX-512 BF16), on skimage's coffee photo, with one
untimed query, then times:

* ``follow-up``: ``predict`` of the same question on the cached image (median of ``--repeats``);
* ``first query``: ``set_image`` + ``predict`` (median of ``--firsts``), and ``of which predict``.

The two processes share the memory bus, so both run slower than alone; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, append_benchmarks, format_table, median

QUESTION = "Can you segment the cup in this image?"


def worker(args: argparse.Namespace) -> None:
    """Runs inside one revision's checkout (its ``src`` first on ``sys.path``); prints one JSON line."""
    import time

    import skimage.data
    import torch

    torch.set_num_threads(args.threads)
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.model import LisaModel
    from reasonseg.model.precision import resolve_dtype

    model = LisaModel.from_pretrained(str(REPO_ROOT / "models" / "lisa-mobile-synth")).eval()
    model.apply_memory_options(dtype=resolve_dtype(args.dtype))
    pred = ReasonSegPredictor(model, max_new_tokens=8)
    image = skimage.data.coffee()
    pred.set_image(image)
    answer = pred.predict(QUESTION).text
    follow, first, first_predict = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pred.predict(QUESTION)
        follow.append(time.perf_counter() - t0)
    for _ in range(args.firsts):
        t0 = time.perf_counter()
        pred.set_image(image)
        t1 = time.perf_counter()
        pred.predict(QUESTION)
        t2 = time.perf_counter()
        first.append(t2 - t0)
        first_predict.append(t2 - t1)
    out = {"follow": follow, "first": first, "first_predict": first_predict, "answer": answer}
    print(json.dumps(out))


def _checkout(rev: str, path: Path) -> Path:
    cmd = ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(path), rev]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_commits: cannot check out revision {rev!r}: {done.stderr.strip()}")
    return path


def _command(core: int | None, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--dtype", args.dtype]
    cmd += ["--repeats", str(args.repeats), "--firsts", str(args.firsts)]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    return cmd


def _run(cmds: dict[str, tuple[list[str], Path]], together: bool) -> dict[str, dict]:
    """Run each (command, checkout) and parse its JSON line; all at once when ``together``."""

    def start(cmd: list[str], tree: Path) -> subprocess.Popen:
        # The revision's package first on the path, ahead of the installed (editable) one.
        env = {
            **os.environ,
            "PYTHONPATH": str(tree / "src"),
            "OMP_NUM_THREADS": str(cmd[cmd.index("--threads") + 1]),
        }
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    results: dict[str, dict] = {}
    procs = {name: start(*c) for name, c in cmds.items()} if together else {}
    for name, c in cmds.items():
        proc = procs.get(name) or start(*c)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench_commits: the {name} run failed (exit {proc.returncode}):\n{err[-3000:]}")
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="the reference revision (a commit, tag or branch)")
    ap.add_argument("--new", default=None, help="the revision to compare (default: this working tree)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=30, help="follow-up queries timed per process")
    ap.add_argument("--firsts", type=int, default=8, help="first queries (set_image + predict) timed")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.base:
        ap.error("--base REV is required")
    if args.repeats < 1 or args.firsts < 1 or args.threads < 1:
        ap.error("--repeats, --firsts and --threads must be >= 1")
    if not (REPO_ROOT / "models" / "lisa-mobile-synth" / "config.json").is_file():
        raise SystemExit("bench_commits: models/lisa-mobile-synth is missing in this checkout")
    together = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        trees: dict[str, Path] = {}
        try:
            trees["base"] = _checkout(args.base, Path(tmp) / "base")
            trees["new"] = _checkout(args.new, Path(tmp) / "new") if args.new else REPO_ROOT
            cmds = {
                name: (_command(i if together else None, args), tree)
                for i, (name, tree) in enumerate(trees.items())
            }
            res = _run(cmds, together)
        finally:
            for path in trees.values():
                if path != REPO_ROOT:
                    subprocess.run(
                        ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)], check=False
                    )
    rows = []
    for key, label in (
        ("follow", "follow-up, cached image"),
        ("first", "first query (set_image + predict)"),
        ("first_predict", "  of which predict"),
    ):
        b, n = median(res["base"][key]) * 1000, median(res["new"][key]) * 1000
        rows.append([label, f"{b:.1f}", f"{n:.1f}", f"{b / n:.2f}"])
    new_name = args.new or "working tree"
    table = format_table(["median ms", f"base {args.base}", f"new {new_name}", "base / new"], rows)
    notes = [
        f"{args.threads} torch thread(s) per process, --dtype {args.dtype}; "
        + ("both processes at once, one core each" if together else "one process after the other")
        + f"; follow-up median of {args.repeats}, first query median of {args.firsts}",
        f"answers: base {res['base']['answer']!r}, new {res['new']['answer']!r}",
    ]
    print(table)
    print("\n".join(notes))
    if not args.no_append:
        append_benchmarks("lisa-mobile, two revisions side by side (CPU)", table, notes)


if __name__ == "__main__":
    main()
