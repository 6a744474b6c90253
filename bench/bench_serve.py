"""Load test of ``reasonseg serve`` on loopback: N requests from C concurrent clients, twice in one run:
with request batching (queue + ``predict_batch``) and with batch size 1, against the same loaded model.

Each request is a multipart upload of one of the bundled example photos plus an instruction; the server is
uvicorn on 127.0.0.1 with the real predictor. Both runs start with the image-encoder cache warmed (one
request per photo, not timed) so the comparison isolates batching. Prints a table of p50/p95 latency and
throughput, the batched/unbatched ratios, and the batch sizes the server formed; exits 1 on any error.

    python bench/bench_serve.py                                  # tiny random lisa-mobile (serving cost)
    python bench/bench_serve.py --model lisa-mobile --no-tiny    # real base weights (slow on a CPU)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src/reasonseg/serving/static/examples"


@dataclass
class RunResult:
    mode: str
    requests: int
    clients: int
    errors: int
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    mean_batch: float
    batch_sizes: dict[str, int]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_once(
    model: Any, name: str, mode: str, args: argparse.Namespace, photos: list[tuple[str, bytes]]
) -> RunResult:
    import httpx
    import uvicorn

    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.serving.app import create_app
    from reasonseg.serving.settings import ServeSettings

    batched = mode == "batched"
    settings = ServeSettings(
        port=_free_port(),
        max_batch_size=args.max_batch_size if batched else 1,
        max_wait_ms=args.max_wait_ms if batched else 0.0,
        request_timeout_s=600,
    )
    app = create_app(
        lambda: ReasonSegPredictor(model, max_new_tokens=args.max_new_tokens),
        settings,
        model_name=name,
        use_predict_batch=batched,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{settings.port}"
    instructions = [
        "What in this picture is the main subject? Please respond with segmentation mask.",
        "Segment the object in the centre.",
        "Where is the background?",
        "Is there anything that could be eaten? Please output segmentation mask.",
    ]

    def one(i: int, client: httpx.Client) -> tuple[float, int]:
        fname, data = photos[i % len(photos)]
        t0 = time.perf_counter()
        r = client.post(
            base + "/v1/segment",
            files={"image": (fname, data, "image/jpeg")},
            data={"instruction": instructions[(i // len(photos)) % len(instructions)]},
        )
        return (time.perf_counter() - t0) * 1e3, r.status_code

    try:
        with httpx.Client(timeout=600) as warm:
            for i in range(len(photos)):  # encode each photo once: both modes start with a warm cache
                assert one(i, warm)[1] == 200
            stats0 = warm.get(base + "/healthz").json()["queue"]
        local = threading.local()

        def task(i: int) -> tuple[float, int]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=600)
            return one(i, local.client)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            results = list(pool.map(task, range(args.requests)))
        wall = time.perf_counter() - t0
        with httpx.Client(timeout=60) as c:
            stats = c.get(base + "/healthz").json()["queue"]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    lat = [ms for ms, _ in results]
    errors = sum(code != 200 for _, code in results)
    sizes = {k: v - stats0["sizes"].get(k, 0) for k, v in stats["sizes"].items()}
    sizes = {k: v for k, v in sizes.items() if v}
    n_batches = sum(sizes.values())
    return RunResult(
        mode=mode,
        requests=args.requests,
        clients=args.clients,
        errors=errors,
        wall_s=wall,
        throughput_rps=args.requests / wall,
        p50_ms=statistics.median(lat),
        p95_ms=_percentile(lat, 95),
        mean_batch=sum(int(k) * v for k, v in sizes.items()) / max(1, n_batches),
        batch_sizes=sizes,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lisa-mobile", help="preset or model directory")
    p.add_argument(
        "--no-tiny", dest="tiny", action="store_false", help="real weights instead of tiny random ones"
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--photos", type=int, default=2, help="distinct example photos the clients send (1-4)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from reasonseg.serving.loading import load_model

    loaded = load_model(args.model, tiny=args.tiny, progress=False)
    index = json.loads((EXAMPLES / "examples.json").read_text())
    photos = [(item["name"], (EXAMPLES / item["name"]).read_bytes()) for item in index][: max(1, args.photos)]
    print(f"model: {loaded.name}; torch threads: {torch.get_num_threads()}; {args.requests} requests from "
          f"{args.clients} clients on {len(photos)} photo(s); max_new_tokens={args.max_new_tokens}")  # fmt: skip
    runs = [run_once(loaded.model, loaded.name, mode, args, photos) for mode in ("batch size 1", "batched")]
    base, fast = runs
    print()
    print("| mode         | requests | errors | p50 ms | p95 ms | req/s | mean batch | wall s |")
    print("|--------------|---------:|-------:|-------:|-------:|------:|-----------:|-------:|")
    for r in runs:
        print(f"| {r.mode:12s} | {r.requests:8d} | {r.errors:6d} | {r.p50_ms:6.0f} | {r.p95_ms:6.0f} | "
              f"{r.throughput_rps:5.2f} | {r.mean_batch:10.2f} | {r.wall_s:6.1f} |")  # fmt: skip
    print()
    print(f"batched / batch size 1: throughput x{fast.throughput_rps / base.throughput_rps:.2f}, "
          f"p50 latency x{fast.p50_ms / base.p50_ms:.2f}, p95 latency x{fast.p95_ms / base.p95_ms:.2f}")  # fmt: skip
    print(f"batch sizes formed (size: count): {fast.batch_sizes}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    total_errors = sum(r.errors for r in runs)
    if total_errors:
        print(f"FAILED: {total_errors} request(s) did not return 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
