"""The built-in model's query latency at two git revisions, side by side on this CPU.

    .venv/bin/python bench/bench_commits.py --base REV [--new REV] [--threads 1] [--repeats 30]
        [--firsts 8] [--no-append]

Absolute times on a shared machine drift by up to 1.5x within an hour, so figures taken in separate
runs cannot show what a change gained. This script checks out ``--base`` (and ``--new``, default: the
working tree) as temporary git worktrees and starts one worker process per revision. Once both have
loaded the model and answered one untimed query, the script asks them in turn for one timed query
each, ``--repeats`` rounds (the interleaving of ``common.time_interleaved``, across processes): only
one works at a time, and slow phases of the machine hit both alike.

Each worker loads ``models/lisa-mobile-synth`` of *this* checkout (the same weights for both), in
``--dtype`` (auto: bf16 where the CPU has AMX / AVX-512 BF16) with ``--threads`` torch threads, on
skimage's coffee photo, and times:

* ``follow-up``: ``predict`` of the same question on the cached image (median of ``--repeats``);
* ``first query``: ``set_image`` + ``predict`` (median of ``--firsts``), and ``of which predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, append_benchmarks, format_table, median

QUESTION = "Can you segment the cup in this image?"


def worker(args: argparse.Namespace) -> None:
    """Runs inside one revision's checkout (its ``src`` first on ``sys.path``). Prints ``ready``, then
    answers each ``follow`` / ``first`` line on stdin with one JSON line of seconds; ``quit`` ends."""
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
    print(json.dumps({"ready": pred.predict(QUESTION).text}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        t0 = time.perf_counter()
        if cmd == "follow":
            pred.predict(QUESTION)
            out = {"follow": time.perf_counter() - t0}
        elif cmd == "first":
            pred.set_image(image)
            t1 = time.perf_counter()
            pred.predict(QUESTION)
            t2 = time.perf_counter()
            out = {"first": t2 - t0, "first_predict": t2 - t1}
        else:
            return
        print(json.dumps(out), flush=True)


def _checkout(rev: str, path: Path) -> Path:
    cmd = ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(path), rev]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_commits: cannot check out revision {rev!r}: {done.stderr.strip()}")
    return path


class _Worker:
    """One revision's worker process: ``ask`` sends a command and returns its JSON answer."""

    def __init__(self, name: str, tree: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--dtype", args.dtype]
        # The revision's package first on the path, ahead of the installed (editable) one.
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(args.threads)}
        self.name = name
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.answer = self._read()["ready"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"bench_commits: the {self.name} worker failed:\n{err[-3000:]}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.communicate("quit\n", timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _measure(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    workers: dict[str, _Worker] = {}
    try:
        for name, tree in trees.items():
            workers[name] = _Worker(name, tree, args)
        res: dict[str, dict] = {n: {"follow": [], "first": [], "first_predict": []} for n in workers}
        for cmd, rounds in (("follow", args.repeats), ("first", args.firsts)):
            for _ in range(rounds):
                for name, w in workers.items():
                    for key, value in w.ask(cmd).items():
                        res[name][key].append(value)
        for name, w in workers.items():
            res[name]["answer"] = w.answer
        return res
    finally:
        for w in workers.values():
            w.close()


def _describe_working_tree() -> str:
    git = ["git", "-C", str(REPO_ROOT)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    # BENCHMARKS.md, which this script appends to, is not a change of the code measured.
    status = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"]
    dirty = subprocess.run(status, capture_output=True, text=True)
    return f"working tree ({head}{' + changes' if dirty.stdout.strip() else ''})"


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
    import torch

    torch.set_num_threads(args.threads)  # as the workers: the machine line of BENCHMARKS.md shows it
    if not (REPO_ROOT / "models" / "lisa-mobile-synth" / "config.json").is_file():
        raise SystemExit("bench_commits: models/lisa-mobile-synth is missing in this checkout")
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        trees: dict[str, Path] = {}
        try:
            trees["base"] = _checkout(args.base, Path(tmp) / "base")
            trees["new"] = _checkout(args.new, Path(tmp) / "new") if args.new else REPO_ROOT
            res = _measure(trees, args)
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
    new_name = args.new or _describe_working_tree()
    table = format_table(["median ms", f"base {args.base}", f"new {new_name}", "base / new"], rows)
    notes = [
        f"{args.threads} torch thread(s), --dtype {args.dtype}; one worker process per revision, asked in "
        f"turn (one query at a time); follow-up median of {args.repeats}, first query median of {args.firsts}",
        f"answers: base {res['base']['answer']!r}, new {res['new']['answer']!r}",
    ]
    print(table)
    print("\n".join(notes))
    if not args.no_append:
        append_benchmarks("lisa-mobile, two revisions side by side (CPU)", table, notes)


if __name__ == "__main__":
    main()
