"""Runners of ``reasonseg segment``, ``reasonseg chat`` and ``reasonseg serve`` (parsers live in cli.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import numpy as np

    from reasonseg.serving.loading import LoadedModel
    from reasonseg.serving.settings import ServeSettings

__all__ = ["run_chat", "run_segment", "run_serve"]


def _load(args: argparse.Namespace) -> LoadedModel:
    from reasonseg.serving.loading import load_model

    loaded = load_model(args.model, tiny=args.tiny, progress=not args.quiet, dtype=args.dtype)
    if not args.quiet:
        print(
            f"model: {loaded.name} ({loaded.source}, {loaded.dtype}, {loaded.seconds:.1f} s)", file=sys.stderr
        )
    return loaded


def _read_image(path: str) -> np.ndarray:
    from reasonseg.data.transforms import load_image

    return load_image(Path(path))


def run_segment(args: argparse.Namespace) -> int:
    """One image, one instruction: print the answer, write overlay, masks and JSON to ``--out``."""
    from reasonseg.cli import prepare_output_dir
    from reasonseg.inference.outputs import SegmentResult, write_result
    from reasonseg.inference.predictor import ReasonSegPredictor

    if not args.instruction.strip():
        raise ValueError("the instruction is empty")
    image = _read_image(args.image)
    prepare_output_dir(args.out)
    loaded = _load(args)
    predictor = ReasonSegPredictor(loaded.model, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    predictor.set_image(image)
    t1 = time.perf_counter()
    prediction = predictor.predict(args.instruction)
    t2 = time.perf_counter()
    result = SegmentResult.from_prediction(
        prediction, args.instruction, image.shape[:2],
        timings_ms={"load_model": loaded.seconds * 1e3, "encode_image": (t1 - t0) * 1e3, "predict": (t2 - t1) * 1e3},
        model=loaded.label,
    )  # fmt: skip
    files = write_result(args.out, image, result)
    print(result.summary())
    print(f"wrote {files.overlay}, {len(files.masks)} mask PNG(s) and {files.json}", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """A multi-turn terminal session on one image; every turn's masks are saved as ``turnNN_*``.

    Commands: ``/reset`` forgets the history, ``/quit`` (or end of input) leaves; any other line that
    starts with ``/`` is refused as an unknown command. Turns already saved in ``--out`` by an earlier
    session are kept: this one numbers its turns after them.
    """
    from reasonseg.cli import prepare_output_dir
    from reasonseg.inference.outputs import SegmentResult, write_result
    from reasonseg.inference.predictor import PromptTooLongError, ReasonSegPredictor

    fin, fout = stdin or sys.stdin, stdout or sys.stdout
    image = _read_image(args.image)
    out = prepare_output_dir(args.out)
    loaded = _load(args)
    predictor = ReasonSegPredictor(loaded.model, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    predictor.set_image(image)
    say: Callable[[str], None] = lambda text: print(text, file=fout, flush=True)  # noqa: E731
    say(f"image {args.image} ({image.shape[1]}x{image.shape[0]}) encoded in {time.perf_counter() - t0:.1f} s; "
        "type an instruction, /reset to start over, /quit to leave")  # fmt: skip
    history = None
    turn = _last_turn(out)
    answered = 0  # --max-turns counts answered prompts; blank lines and /commands are free
    while answered < args.max_turns:
        print("you> ", end="", file=fout, flush=True)
        line = fin.readline()
        if not line:
            say("")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = None
            say("(history cleared)")
            continue
        if text.startswith("/"):
            say(f"(unknown command {text.split()[0]}: /reset clears the history, /quit leaves)")
            continue
        t1 = time.perf_counter()
        try:
            prediction = predictor.predict(text, history=history)
        except PromptTooLongError as exc:
            say(f"({exc}; /reset clears the history)")
            continue
        turn += 1
        answered += 1
        history = prediction.history[-2 * args.max_history :] if args.max_history else None
        result = SegmentResult.from_prediction(
            prediction, text, image.shape[:2], timings_ms={"predict": (time.perf_counter() - t1) * 1e3},
            model=loaded.label,
        )  # fmt: skip
        files = write_result(args.out, image, result, stem=f"turn{turn:02d}_")
        say("model> " + result.summary().replace("\n", "\n       "))
        say(f"       (saved {files.overlay.name}, {len(files.masks)} mask(s) in {args.out})")
    else:
        say(f"(stopping after {args.max_turns} turns)")
    return 0


def _last_turn(out: Path) -> int:
    """The highest turn number NN of the ``turnNN_result.json`` files in ``out`` (0 when none)."""
    numbers = [int(p.name[4:-12]) for p in out.glob("turn*_result.json") if p.name[4:-12].isdigit()]
    return max(numbers, default=0)


_SERVE_FLAGS = {
    "host": "--host",
    "port": "--port",
    "token": "--token",
    "max_upload_bytes": "--max-upload-mb",
    "max_pixels": "--max-pixels",
    "max_instruction_chars": "--max-instruction-chars",
    "request_timeout_s": "--timeout",
    "max_batch_size": "--max-batch-size",
    "max_wait_ms": "--max-wait-ms",
    "cache_bytes": "--cache-mb",
}
"""The ``serve`` flag that fills each :class:`ServeSettings` field."""


def _flag_message(message: str, args: argparse.Namespace) -> str:
    """A ``ServeSettings.field=value: why`` error restated with the command-line flag and its value."""
    for field, flag in _SERVE_FLAGS.items():
        if message.startswith(f"ServeSettings.{field}="):
            value = "***" if field == "token" else getattr(args, flag[2:].replace("-", "_"))
            return f"{flag} {value}: {message.split(': ', 1)[1]}"
    return message


def _check_port(host: str, port: int) -> None:
    """Raise a ValueError naming ``--host``/``--port`` when nothing can listen there (taken, no such
    address); the socket is closed again at once and uvicorn binds it for real."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((host, port))
    except OSError as err:
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err})"
        ) from None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings: the flags given on the command line (``None``: not given), then for the
    other fields the ``REASONSEG_SERVE_*`` environment variables, then :class:`ServeSettings`' defaults.
    A bad value raises a ValueError naming its flag or its variable."""
    from reasonseg.serving.settings import ServeSettings

    mib = 2**20
    given = {
        "host": args.host,
        "port": args.port,
        "token": args.token,
        "max_upload_bytes": None if args.max_upload_mb is None else int(args.max_upload_mb * mib),
        "max_pixels": args.max_pixels,
        "max_instruction_chars": args.max_instruction_chars,
        "request_timeout_s": args.timeout,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "cache_bytes": None if args.cache_mb is None else int(args.cache_mb * mib),
        "enable_page": False if args.no_page else None,
    }
    flags = {k: v for k, v in given.items() if v is not None}
    try:
        settings = ServeSettings(**flags)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(_flag_message(str(err), args)) from None
    try:
        return settings.with_env(keep=flags)
    except ValueError as err:
        raise ValueError(f"with the REASONSEG_SERVE_* environment variables: {err}") from None


def run_serve(args: argparse.Namespace) -> int:
    """Start the API + web page with uvicorn (loopback unless ``--host`` says otherwise)."""
    import uvicorn

    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.serving.app import create_app

    settings = serve_settings(args)
    _check_port(settings.host, settings.port)  # before the model loads: a taken port fails at once
    if not settings.is_loopback and settings.token is None:
        print(f"warning: listening on {settings.host} without a token: anyone who can reach this machine can "
              "use the model (set --token or REASONSEG_SERVE_TOKEN)", file=sys.stderr)  # fmt: skip
    loaded = _load(args)
    model = loaded.model
    max_new = args.max_new_tokens
    app = create_app(
        lambda: ReasonSegPredictor(model, max_new_tokens=max_new), settings, model_name=loaded.label
    )
    print(
        f"serving {loaded.label} on http://{settings.host}:{settings.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning" if args.quiet else "info")
    return 0
