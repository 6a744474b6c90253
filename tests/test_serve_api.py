"""The HTTP API against a test double of the predictor: results, conversations, the encoder cache,
batching of concurrent requests, auth, and bad requests that each get a 4xx JSON error while the server
keeps serving."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from reasonseg.inference.outputs import decode_rle
from reasonseg.serving.app import create_app
from reasonseg.serving.settings import ServeSettings
from serve_fakes import FakePredictor, huge_png_header, jpeg_bytes, make_image, png_bytes

SETTINGS = ServeSettings(
    max_upload_bytes=200_000, max_pixels=1_000_000, max_side=2000, max_instruction_chars=500
)


@pytest.fixture
def client() -> Iterator[TestClient]:
    FakePredictor.reset()
    app = create_app(lambda: FakePredictor(fail_on="explode"), SETTINGS, model_name="fake")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(
    client: TestClient, image: bytes, instruction: str = "segment the bright part", **fields: str
) -> httpx.Response:
    return client.post(
        "/v1/segment",
        files={"image": ("img.png", image, "image/png")},
        data={"instruction": instruction, **fields},
    )


def _still_serving(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ok = _post(client, png_bytes(make_image(seed=9)))
    assert ok.status_code == 200, ok.text


def test_multipart_and_json_give_the_same_masks(client: TestClient) -> None:
    img = make_image()
    r1 = _post(client, png_bytes(img))
    assert r1.status_code == 200, r1.text
    body = r1.json()
    assert body["answer"] == "Sure, bright part:[SEG]." and body["model"] == "fake"
    assert body["image"] == {"height": 48, "width": 64}
    (target,) = body["targets"]
    mask = decode_rle(target["mask"])
    gray = img.astype(np.float32).mean(axis=2)
    np.testing.assert_array_equal(mask, gray >= gray.mean())
    assert target["area"] == int(mask.sum()) and target["label"] == "bright part" and not target["rejected"]
    assert body["cache_hit"] is False and body["turn"] == 1
    assert set(body["timings_ms"]) >= {"decode", "encode_image", "model_call", "total"}

    r2 = client.post(
        "/v1/segment",
        json={"image_base64": base64.b64encode(png_bytes(img)).decode(), "instruction": "bright"},
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["targets"][0]["mask"] == target["mask"]
    assert r2.json()["cache_hit"] is True  # same pixels: the image was encoded once
    assert FakePredictor.set_image_calls == 1


def test_overlay_png_tints_the_mask(client: TestClient) -> None:
    import io

    from PIL import Image

    img = make_image()
    r = _post(client, png_bytes(img), "the bright part", return_overlay="true")
    body = r.json()
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"]))).convert("RGB"))
    assert overlay.shape == img.shape
    mask = decode_rle(body["targets"][0]["mask"])
    inside = np.abs(overlay[mask].astype(int) - img[mask].astype(int)).mean()
    assert inside > 10  # the masked square is drawn over


def test_rejection_and_masks_off(client: TestClient) -> None:
    r = _post(client, png_bytes(make_image()), "the absent thing", return_masks="false")
    assert r.status_code == 200
    body = r.json()
    assert body["rejections"] == [0] and body["targets"][0]["rejected"] is True
    assert body["targets"][0]["score"] is None and body["targets"][0].get("mask") is None


def test_conversation_keeps_history_on_the_same_image(client: TestClient) -> None:
    img = png_bytes(make_image())
    first = _post(client, img, "the bright part").json()
    cid = first["conversation_id"]
    second = _post(client, img, "now the dark part", conversation_id=cid)
    assert second.status_code == 200 and second.json()["turn"] == 2
    history = [h for h in FakePredictor.histories if h][-1]
    assert [(t.role, t.text) for t in history] == [
        ("user", "the bright part"),
        ("assistant", first["answer"]),
    ]
    other = _post(client, png_bytes(make_image(seed=5)), "and here?", conversation_id=cid)
    assert other.status_code == 409 and other.json()["error"]["code"] == "conversation_image_mismatch"
    for i in range(3, 13):  # past max_history_turns (8): the turn count goes on, the history is capped
        last = _post(client, img, f"turn {i}", conversation_id=cid)
    assert last.json()["turn"] == 12
    assert len([h for h in FakePredictor.histories if h][-1]) == 2 * SETTINGS.max_history_turns
    unknown = _post(client, img, "hi", conversation_id="nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "conversation_id"


def _truncated_jpeg() -> bytes:
    data = jpeg_bytes(make_image(96, 128))
    return data[: len(data) // 2]


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("non-image bytes", {"files": {"image": ("x.png", b"hello, not an image" * 10, "image/png")},
                         "data": {"instruction": "x"}}, 422, "invalid_image", "image"),
    ("truncated JPEG", {"files": {"image": ("x.jpg", _truncated_jpeg(), "image/jpeg")},
                        "data": {"instruction": "x"}}, 422, "invalid_image", "image"),
    ("huge dimensions", {"files": {"image": ("x.png", huge_png_header(100_000, 100_000), "image/png")},
                         "data": {"instruction": "x"}}, 413, "image_too_large", "image"),
    ("empty image", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"instruction": "x"}},
     422, "empty_image", "image"),
    ("empty instruction", {"files": {"image": ("x.png", png_bytes(make_image()), "image/png")},
                           "data": {"instruction": "   "}}, 422, "empty_instruction", "instruction"),
    ("100k-character instruction", {"files": {"image": ("x.png", png_bytes(make_image()), "image/png")},
                                    "data": {"instruction": "a" * 100_000}}, 422, "instruction_too_long",
     "instruction"),
    ("wrong content type", {"content": b"instruction=x", "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type", None),
    ("form-urlencoded", {"data": {"instruction": "x"}}, 415, "unsupported_media_type", None),
    ("missing image", {"files": {"other": ("x.png", b"123", "image/png")}, "data": {"instruction": "x"}},
     422, "missing_field", "image"),
    ("missing instruction", {"files": {"image": ("x.png", png_bytes(make_image()), "image/png")}},
     422, "missing_field", "instruction"),
    ("image as text field", {"files": {"dummy": ("d", b"", "text/plain")}, "data": {"image": "abc",
                                                                                    "instruction": "x"}},
     422, "invalid_field", "image"),
    ("JSON missing image", {"json": {"instruction": "x"}}, 422, "missing_field", "image_base64"),
    ("JSON bad base64", {"json": {"image_base64": "***", "instruction": "x"}}, 422, "invalid_base64",
     "image_base64"),
    ("JSON not an object", {"json": [1, 2]}, 422, "invalid_json", None),
    ("broken JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "invalid_json", None),
    ("JSON instruction not a string", {"json": {"image_base64": "", "instruction": 5}}, 422, "invalid_field",
     "instruction"),
    ("unknown field", {"json": {"image_base64": "", "instruction": "x", "path": "/etc/passwd"}}, 422,
     "unknown_field", "path"),
    ("bad conversation id", {"files": {"image": ("x.png", png_bytes(make_image()), "image/png")},
                             "data": {"instruction": "x", "conversation_id": "../../x"}}, 422, "invalid_field",
     "conversation_id"),
    ("bad boolean", {"files": {"image": ("x.png", png_bytes(make_image()), "image/png")},
                     "data": {"instruction": "x", "return_overlay": "maybe"}}, 422, "invalid_field",
     "return_overlay"),
    ("body too large", {"files": {"image": ("x.png", b"\0" * 400_000, "image/png")}, "data": {"instruction": "x"}},
     413, "body_too_large", None),
    ("EPS (external decoder)", {"files": {"image": ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                                    "application/postscript")},
                                "data": {"instruction": "x"}}, 422, "invalid_image", "image"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "request_kwargs", "status", "code", "field"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_a_named_4xx_and_the_server_keeps_serving(
    client: TestClient, what: str, request_kwargs: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    r = client.post("/v1/segment", **request_kwargs)
    assert r.status_code == status, (what, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["field"] == field and err["message"]
    _still_serving(client)


def test_model_failure_is_a_json_500_and_others_still_work(client: TestClient) -> None:
    r = _post(client, png_bytes(make_image()), "explode")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    _still_serving(client)


def test_a_prompt_over_the_context_is_a_400_naming_the_instruction(client: TestClient) -> None:
    r = _post(client, png_bytes(make_image()), "a question far too long")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and err["field"] == "instruction" and "context" in err["message"]
    _still_serving(client)


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/v1/segment").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/etc/passwd").status_code == 404
    assert client.get("/static/../settings.py").status_code == 404


def test_bearer_token() -> None:
    app = create_app(FakePredictor, ServeSettings(token="s3cret-token"))
    with TestClient(app) as c:
        img = png_bytes(make_image())
        files = {"image": ("x.png", img, "image/png")}
        r = c.post("/v1/segment", files=files, data={"instruction": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post(
            "/v1/segment", files=files, data={"instruction": "x"}, headers={"Authorization": "Bearer wrong"}
        )
        assert r.status_code == 401
        r = c.post(
            "/v1/segment",
            files=files,
            data={"instruction": "x"},
            headers={"Authorization": "Bearer s3cret-token"},
        )
        assert r.status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open


def test_concurrent_requests_are_batched_and_share_the_encoded_image() -> None:
    FakePredictor.reset()
    app = create_app(FakePredictor, ServeSettings(max_batch_size=8, max_wait_ms=200))
    img = png_bytes(make_image())

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await asyncio.gather(
                    *(
                        c.post(
                            "/v1/segment",
                            files={"image": ("x.png", img, "image/png")},
                            data={"instruction": f"b{i}"},
                        )
                        for i in range(6)
                    )
                )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert FakePredictor.set_image_calls == 1
    assert max(r.json()["batch_size"] for r in responses) > 1
    assert sum(FakePredictor.batch_calls) + FakePredictor.predict_calls == 6


def test_page_examples_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="instruction"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    examples = client.get("/v1/examples").json()
    assert len(examples) >= 3
    photo = client.get(examples[0]["url"])
    assert photo.status_code == 200 and photo.content[:2] == b"\xff\xd8"
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}


def test_request_timeout_is_a_json_504_and_the_server_recovers() -> None:
    import time

    class SlowPredictor(FakePredictor):
        def predict(self, instruction, history=None):  # type: ignore[no-untyped-def]
            if "slow" in instruction:
                time.sleep(0.5)
            return super().predict(instruction, history)

    app = create_app(SlowPredictor, ServeSettings(request_timeout_s=0.2, max_wait_ms=0))
    with TestClient(app) as c:
        r = _post(c, png_bytes(make_image()), "slow please")
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        time.sleep(0.4)  # the model thread finishes the abandoned request
        assert _post(c, png_bytes(make_image()), "quick").status_code == 200
