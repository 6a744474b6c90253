"""The serving stack with the real predictor over a tiny random lisa-mobile: HTTP results, the shared
encoder cache, conversations, concurrent batching, and the ``segment`` / ``chat`` commands."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reasonseg.cli import main
from reasonseg.inference.predictor import ReasonSegPredictor
from reasonseg.serving.app import create_app
from reasonseg.serving.settings import ServeSettings
from serve_fakes import huge_png_header, make_image, png_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "src/reasonseg/serving/static/examples/coffee.jpg"


@pytest.fixture(scope="module")
def tiny_model():  # type: ignore[no-untyped-def]
    from reasonseg.model.lisa import LisaModel

    return LisaModel.from_preset("lisa-mobile", tiny=True).eval()


class CountingPredictor(ReasonSegPredictor):
    encodes = 0

    def set_image(self, image) -> None:  # type: ignore[no-untyped-def]
        CountingPredictor.encodes += 1
        super().set_image(image)


@pytest.fixture
def client(tiny_model) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    CountingPredictor.encodes = 0
    app = create_app(
        lambda: CountingPredictor(tiny_model, max_new_tokens=6), ServeSettings(), model_name="tiny"
    )
    with TestClient(app) as c:
        yield c


def test_real_predictor_over_http_with_cache_and_conversation(client: TestClient) -> None:
    img = png_bytes(make_image(40, 56))
    files = {"image": ("a.png", img, "image/png")}
    r1 = client.post(
        "/v1/segment", files=files, data={"instruction": "segment the square", "return_overlay": "1"}
    )
    assert r1.status_code == 200, r1.text
    b1 = r1.json()
    assert b1["image"] == {"height": 40, "width": 56} and b1["model"] == "tiny" and not b1["cache_hit"]
    assert len(b1["targets"]) == len(b1["answer"].split("[SEG]")) - 1 + b1["answer"].count("[REJ]")
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(b1["overlay_png_base64"]))))
    assert overlay.shape == (40, 56, 3)
    r2 = client.post(
        "/v1/segment",
        files=files,
        data={"instruction": "and again", "conversation_id": b1["conversation_id"]},
    )
    assert r2.status_code == 200 and r2.json()["turn"] == 2 and r2.json()["cache_hit"]
    assert CountingPredictor.encodes == 1  # one image, two requests: encoded once
    health = client.get("/healthz").json()
    assert health["cache"]["entries"] == 1 and health["cache"]["bytes"] > 0


def test_bad_input_then_still_serving(client: TestClient) -> None:
    bad = client.post("/v1/segment", files={"image": ("x.png", huge_png_header(9000, 9000), "image/png")},
                      data={"instruction": "x"})  # fmt: skip
    assert bad.status_code == 413 and bad.json()["error"]["field"] == "image"
    ok = client.post("/v1/segment", files={"image": ("c.jpg", EXAMPLE.read_bytes(), "image/jpeg")},
                     data={"instruction": "the cup"})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["image"] == {"height": 341, "width": 512}


def test_concurrent_requests_on_one_image_share_a_batch(tiny_model) -> None:  # type: ignore[no-untyped-def]
    CountingPredictor.encodes = 0
    app = create_app(lambda: CountingPredictor(tiny_model, max_new_tokens=4), ServeSettings(max_wait_ms=300))
    img = png_bytes(make_image())

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            return await asyncio.gather(*(
                c.post("/v1/segment", files={"image": ("x.png", img, "image/png")}, data={"instruction": f"q{i}"})
                for i in range(4)
            ))  # fmt: skip

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 4
    assert CountingPredictor.encodes == 1 and max(r.json()["batch_size"] for r in rs) > 1


def test_engine_answers_single_turn_requests_on_several_images_in_one_decode(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """One batch with requests on two images (and a multi-turn one): the single-turn ones go through one
    predict_many decode across both images, each answered as its own predictor would, and each image's
    encode time is charged to one request only."""
    from reasonseg.serving.engine import SegmentEngine, SegmentJob

    CountingPredictor.encodes = 0
    engine = SegmentEngine(lambda: CountingPredictor(tiny_model, max_new_tokens=6), cache_bytes=10**9)
    imgs = {"a": make_image(), "b": np.ascontiguousarray(make_image()[::-1, ::-1])}
    jobs = [
        SegmentJob(imgs["a"], "a", "Where is the cat?"),
        SegmentJob(imgs["b"], "b", "Segment the red thing."),
        SegmentJob(
            imgs["a"], "a", "And the dog?", history=[("user", "Where is the cat?"), ("assistant", "It is.")]
        ),
        SegmentJob(imgs["b"], "b", "What could I eat here?"),
    ]
    results = engine.run(jobs)
    assert CountingPredictor.encodes == 2
    assert all(not isinstance(r, BaseException) for r in results), results
    assert [r.batch_size for r in results] == [3, 3, 1, 3]  # type: ignore[union-attr]
    assert sum(r.encode_s > 0 for r in results) == 2  # type: ignore[union-attr]
    for job, r in zip(jobs, results, strict=True):
        ref = ReasonSegPredictor(tiny_model, max_new_tokens=6, cache_prefix=False)
        ref.set_image(job.image)
        turns = [type(r.prediction.history[0])(role, text) for role, text in job.history]  # type: ignore[union-attr]
        expected = ref.predict(job.instruction, history=turns or None)
        assert r.prediction.text == expected.text  # type: ignore[union-attr]
        assert np.array_equal(r.prediction.masks, expected.masks), job.instruction  # type: ignore[union-attr]


def test_segment_command_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["segment", str(EXAMPLE), "where is the cup?", "--model", "lisa-mobile", "--tiny",
                 "--max-new-tokens", "4", "--quiet", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["instruction"] == "where is the cup?" and record["image"] == {"height": 341, "width": 512}
    assert set(record["timings_ms"]) == {"load_model", "encode_image", "predict"}
    assert (tmp_path / "overlay.png").is_file()
    assert len(list(tmp_path.glob("mask_*.png"))) == len([t for t in record["targets"] if not t["rejected"]])
    assert record["answer"] in capsys.readouterr().out


def test_segment_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["segment", str(bad), "x", "--tiny", "--quiet"]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["segment", str(EXAMPLE), "x", "--model", "no-such-model", "--quiet"]) == 2
    assert "lisa-mobile" in capsys.readouterr().err  # the error lists the presets


def test_bad_arguments_fail_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import reasonseg.serving.loading as loading

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["segment", str(EXAMPLE), "  "], "the instruction is empty"),
        (["segment", str(EXAMPLE), "x", "--out", str(afile)], "exists and is not a directory"),
        (["segment", str(EXAMPLE), "x", "--out", str(afile / "sub")], "cannot create the directory (Not a"),
        (["chat", str(EXAMPLE), "--out", str(afile)], "exists and is not a directory"),
        (["demo", "--out", str(afile)], "exists and is not a directory"),
        (["demo", "--box", "100", "100", "10", "10"], "needs X1 > X0 and Y1 > Y0"),
        (
            ["train", "recipes/lisa-mobile.yaml", "--shard", "0/2"],
            "--shard applies only with --prefill-cache",
        ),
        (
            ["serve", "--max-upload-mb", "0"],
            "--max-upload-mb 0.0: must be positive",
        ),  # the flag, not the field
    ]
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases.append((["serve", "--port", str(port)], f"--port {port}: cannot listen there"))
    for argv, message in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(
                loading,
                "load_model",
                lambda *a, _argv=argv, **k: pytest.fail(f"{_argv}: the model was loaded"),
            )
            assert main([*argv, "--quiet"] if argv[0] in ("segment", "chat", "serve") else argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    taken.close()
    for argv in (
        ["segment", str(EXAMPLE), "x", "--max-new-tokens", "0"],
        ["chat", str(EXAMPLE), "--max-turns", "-1"],
        ["chat", str(EXAMPLE), "--max-history", "-2"],
        ["serve", "--max-new-tokens", "-3"],
        ["train", "recipes/lisa-mobile.yaml", "--max-steps", "0"],
        ["synth", "--out", str(tmp_path / "w"), "--n", "3", "--workers", "-1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert "expected an integer >=" in capsys.readouterr().err, argv


def test_a_corrupt_model_directory_is_named(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from reasonseg.model import LisaModel

    d = tmp_path / "m"
    tiny_model.save_pretrained(d)
    weights = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights.name}: not a readable safetensors file"):
        LisaModel.from_pretrained(d)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{weights.name}: missing"):
        LisaModel.from_pretrained(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, found list"):
        LisaModel.from_pretrained(d)
    (d / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        LisaModel.from_pretrained(d)


def test_chat_keeps_history_and_saves_each_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from reasonseg.serving.commands import run_chat

    seen: list[int] = []
    original = ReasonSegPredictor.predict

    def spy(self, instruction, history=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(len(history or []))
        return original(self, instruction, history=history, **kw)

    monkeypatch.setattr(ReasonSegPredictor, "predict", spy)
    args = argparse.Namespace(image=str(EXAMPLE), model="lisa-mobile", tiny=True, quiet=True, max_new_tokens=4, dtype="auto",
                              out=str(tmp_path), max_turns=10, max_history=8)  # fmt: skip
    out = io.StringIO()
    code = run_chat(args, stdin=io.StringIO("first question\n\nsecond one\n/reset\nthird\n"), stdout=out)
    assert code == 0
    assert seen == [0, 2, 0]  # history grows by one exchange, /reset clears it
    for turn in (1, 2, 3):
        assert (tmp_path / f"turn{turn:02d}_result.json").is_file()
        assert (tmp_path / f"turn{turn:02d}_overlay.png").is_file()
    assert out.getvalue().count("model>") == 3 and "(history cleared)" in out.getvalue()
    # A second session into the same folder keeps the first one's turns and numbers its own after them;
    # an unknown slash command is refused, not sent to the model.
    first = (tmp_path / "turn01_result.json").read_bytes()
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("/bogus\nfourth\n"), stdout=out) == 0
    assert "(unknown command /bogus" in out.getvalue() and out.getvalue().count("model>") == 1
    assert (tmp_path / "turn01_result.json").read_bytes() == first
    assert (tmp_path / "turn04_result.json").is_file() and not (tmp_path / "turn05_result.json").exists()
    # An instruction over the LM's context is reported and the session goes on, numbering on.
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("cat " * 2000 + "\nfifth\n"), stdout=out) == 0
    assert "over the LM's context" in out.getvalue() and "/reset clears the history" in out.getvalue()
    assert out.getvalue().count("model>") == 1
    assert (tmp_path / "turn05_result.json").is_file() and not (tmp_path / "turn06_result.json").exists()
    # --max-turns counts answered prompts only: blank lines and /commands do not use one up.
    out = io.StringIO()
    args.max_turns = 1
    assert run_chat(args, stdin=io.StringIO("\n/reset\n/bogus\nsixth\nseventh\n"), stdout=out) == 0
    assert out.getvalue().count("model>") == 1 and "(stopping after 1 turns)" in out.getvalue()
    assert (tmp_path / "turn06_result.json").is_file() and not (tmp_path / "turn07_result.json").exists()


def test_default_model_falls_back_to_untrained_preset_with_a_warning() -> None:
    from reasonseg.serving.loading import BUILTIN_MODEL_DIR, DEFAULT_MODEL, load_model

    if (BUILTIN_MODEL_DIR / "config.json").is_file():
        pytest.skip("the trained built-in model is present")
    with pytest.warns(UserWarning, match="UNTRAINED 'lisa-mobile'"):
        loaded = load_model(DEFAULT_MODEL, tiny=True, progress=False)
    assert loaded.untrained and loaded.source == "preset:lisa-mobile"


def test_model_directory_is_accepted(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from transformers.utils import logging as hf_logging

    from reasonseg.model import LisaModel
    from reasonseg.serving.loading import load_model

    tiny_model.save_pretrained(tmp_path / "m")
    bars: list[bool] = []
    real = LisaModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls, *a, **k):  # type: ignore[no-untyped-def]
        bars.append(hf_logging.is_progress_bar_enabled())
        return real(cls, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LisaModel, "from_pretrained", classmethod(spy))
        loaded = load_model(str(tmp_path / "m"), progress=False)
    assert loaded.name == "m" and not loaded.untrained and loaded.source == str(tmp_path / "m")
    with pytest.raises(ValueError, match="--tiny applies to a preset --model"):
        load_model(str(tmp_path / "m"), tiny=True, progress=False)  # was silently ignored
    # --quiet: transformers' own loading bars are off while loading, and back on afterwards.
    assert bars == [False] and hf_logging.is_progress_bar_enabled()


@pytest.mark.slow
def test_serve_command_listens_on_loopback(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reasonseg.cli", "serve", "--tiny", "--model", "lisa-mobile", "--quiet",
         "--port", str(port), "--max-new-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok", proc.stdout.read() if proc.stdout else ""
        assert "tiny" in health["model"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/segment", timeout=60,
                       files={"image": ("c.jpg", EXAMPLE.read_bytes(), "image/jpeg")}, data={"instruction": "cup"})  # fmt: skip
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
