"""The HTTP API and web page: ``create_app(predictor_factory, settings)`` returns a FastAPI application.

Routes:
    ``POST /v1/segment``   an image and an instruction -> the answer, one COCO-RLE mask per target, scores,
                           rejections, timings (and an overlay PNG on request). The body is either
                           ``multipart/form-data`` (fields ``image`` (file), ``instruction``, optional
                           ``conversation_id``, ``return_overlay``, ``return_masks``) or ``application/json``
                           (``image_base64`` instead of the file). A reply carries a ``conversation_id``; send it
                           back with the same image to continue the conversation (the history stays here).
    ``GET /v1/examples``   the example photos and instructions shown by the page.
    ``GET /healthz``       liveness plus queue, batching and cache counters.
    ``GET /``              the web page (``static/``); ``/openapi.json`` and ``/docs`` describe the API.

Every error is JSON ``{"error": {"code", "message", "field"}}`` with a 4xx/5xx status. Clients send bytes,
never paths: nothing in a request can make the server open a file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reasonseg.inference.errors import PromptTooLongError
from reasonseg.serving.batching import BatchQueue, QueueFullError
from reasonseg.serving.cache import image_key
from reasonseg.serving.engine import JobResult, PredictorLike, SegmentEngine, SegmentJob
from reasonseg.serving.settings import ServeSettings

__all__ = ["ApiError", "create_app", "decode_image_bytes"]

STATIC_DIR = Path(__file__).parent / "static"
EXAMPLES_DIR = STATIC_DIR / "examples"
log = logging.getLogger("reasonseg.serving")
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ApiError(Exception):
    """A request problem reported to the client as ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------- schemas (docs)


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_image, instruction_too_long")
    message: str = Field(description="what was wrong, for people")
    field: str | None = Field(None, description="the request field at fault, when there is one")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RleMask(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.encode)")


class TargetOut(BaseModel):
    index: int
    label: str | None
    rejected: bool = Field(description="true for [REJ]: the target is not in the image and has no mask")
    score: float | None
    area: int | None = None
    bbox: list[int] | None = Field(None, description="[x, y, width, height] in pixels")
    mask: RleMask | None = None


class ImageInfo(BaseModel):
    height: int
    width: int


class SegmentResponse(BaseModel):
    instruction: str
    answer: str
    image: ImageInfo
    targets: list[TargetOut]
    rejections: list[int]
    timings_ms: dict[str, float]
    model: str | None
    conversation_id: str
    turn: int = Field(description="1 for the first instruction of a conversation")
    cache_hit: bool = Field(description="the image was already encoded (same pixels seen before)")
    batch_size: int = Field(description="requests that shared this model call")
    overlay_png_base64: str | None = None


class HealthResponse(BaseModel):
    status: str
    model: str | None
    queue: dict[str, Any]
    cache: dict[str, Any]
    conversations: int


class ExampleOut(BaseModel):
    name: str
    title: str
    instruction: str
    url: str


def _request_schemas(settings: ServeSettings) -> dict[str, Any]:
    """The two request bodies of ``POST /v1/segment`` as OpenAPI schemas, with this server's limits."""
    instruction = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_instruction_chars,
        "pattern": r"\S",
        "description": "what to segment, in words (leading/trailing blanks are stripped)",
    }
    conversation = {
        "type": "string",
        "pattern": _CONVERSATION_ID.pattern,
        "description": "continue this conversation",
    }
    options = {
        "conversation_id": conversation,
        "return_overlay": {
            "type": "boolean",
            "default": False,
            "description": "include an overlay PNG (base64)",
        },
        "return_masks": {"type": "boolean", "default": True, "description": "include COCO RLE masks"},
    }
    image_note = f"JPEG, PNG, WebP, BMP, GIF or TIFF; at most {settings.max_upload_bytes} bytes, " + (
        f"{settings.max_pixels} pixels and {settings.max_side} pixels per side"
    )
    multipart = {
        "type": "object",
        "required": ["image", "instruction"],
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "binary", "description": f"the image file: {image_note}"},
            "instruction": instruction,
            **options,
        },
    }
    as_json = {
        "type": "object",
        "required": ["image_base64", "instruction"],
        "additionalProperties": False,
        "properties": {
            "image_base64": {"type": "string", "minLength": 1, "format": "byte",
                             "description": f"the image file, base64 (a data: URL is accepted): {image_note}"},
            "instruction": instruction,
            **options,
        },
    }  # fmt: skip
    return {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": as_json}}


_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed body",
        401: "missing or wrong bearer token",
        404: "unknown conversation",
        409: "conversation belongs to another image",
        413: "upload or image too large",
        415: "unsupported content type",
        422: "invalid field (image, instruction, ...)",
        500: "the model failed",
        503: "queue full",
        504: "request timed out",
    }.items()
}


# ----------------------------------------------------------------------------------------- request parsing


def decode_image_bytes(data: bytes, settings: ServeSettings, field_name: str = "image") -> np.ndarray:
    """Decode an uploaded image to HxWx3 uint8 RGB (EXIF orientation applied), enforcing the limits.

    The header is read first, so a decompression bomb is refused before any pixel is decoded; only common
    raster formats are accepted (no EPS/PDF and friends, whose decoders run external programs).

    Raises:
        ApiError: 413 (too many bytes, pixels or too long a side) or 422 (empty, not an image, truncated).
    """
    from PIL import Image, UnidentifiedImageError

    from reasonseg.data.transforms import ImageError, load_image

    if not data:
        raise ApiError(422, "empty_image", "the image is empty (0 bytes)", field_name)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, "upload_too_large", f"the image is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
            field_name,
        )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
        with probe:
            width, height = probe.size
            fmt = probe.format
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"image refused before decoding: {exc}", field_name) from None
    except UnidentifiedImageError:
        raise ApiError(
            422, "invalid_image", f"not a decodable image; accepted formats: {', '.join(_ALLOWED_FORMATS)}",
            field_name,
        ) from None  # fmt: skip
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(422, "invalid_image", f"unreadable image header: {exc}", field_name) from None
    if width < 1 or height < 1:
        raise ApiError(422, "invalid_image", f"{fmt} image has size {width}x{height}", field_name)
    if max(width, height) > settings.max_side or width * height > settings.max_pixels:
        raise ApiError(
            413, "image_too_large",
            f"{fmt} image is {width}x{height} ({width * height} pixels); the limits are "
            f"{settings.max_side} pixels per side and {settings.max_pixels} pixels",
            field_name,
        )  # fmt: skip
    try:
        image = load_image(data, max_pixels=settings.max_pixels)
    except (ImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(
            422, "invalid_image", f"{fmt} image is truncated or corrupt: {exc}", field_name
        ) from None
    return image


def _check_instruction(text: Any, settings: ServeSettings) -> str:
    if not isinstance(text, str):
        raise ApiError(422, "invalid_field", "instruction must be a string", "instruction")
    text = text.strip()
    if not text:
        raise ApiError(422, "empty_instruction", "the instruction is empty", "instruction")
    if len(text) > settings.max_instruction_chars:
        raise ApiError(
            422, "instruction_too_long",
            f"the instruction has {len(text)} characters; the limit is {settings.max_instruction_chars}",
            "instruction",
        )  # fmt: skip
    if "\x00" in text:
        raise ApiError(422, "invalid_field", "the instruction contains a NUL character", "instruction")
    return text


def _parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ApiError(422, "invalid_field", f"{name} must be a boolean (true/false)", name)


def _parse_conversation_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CONVERSATION_ID.match(value):
        raise ApiError(
            422,
            "invalid_field",
            "conversation_id must be 1-64 characters of A-Z a-z 0-9 _ -",
            "conversation_id",
        )
    return value


@dataclass
class _Parsed:
    image_bytes: bytes
    instruction: str
    conversation_id: str | None
    return_overlay: bool
    return_masks: bool


_OPTIONS = {"instruction", "conversation_id", "return_overlay", "return_masks"}


async def _parse_request(request: Request, settings: ServeSettings) -> _Parsed:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=16)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in fields:
                raise ApiError(422, "duplicate_field", f"field {key!r} is given more than once", key)
            fields[key] = value
        upload = fields.get("image")
        if upload is None:
            raise ApiError(422, "missing_field", "multipart field 'image' (a file) is required", "image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_field", "field 'image' must be a file upload, not text", "image")
        image_bytes = await upload.read(settings.max_upload_bytes + 1)
        raw: dict[str, Any] = fields
    elif ctype == "application/json":
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "invalid_json", "the JSON body must be an object")
        b64 = raw.get("image_base64")
        if b64 is None:
            raise ApiError(422, "missing_field", "field 'image_base64' is required", "image_base64")
        if not isinstance(b64, str):
            raise ApiError(422, "invalid_field", "image_base64 must be a base64 string", "image_base64")
        if b64.startswith("data:") and "," in b64:  # accept data URLs from browsers
            b64 = b64.split(",", 1)[1]
        try:
            image_bytes = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                422, "invalid_base64", "image_base64 is not valid base64", "image_base64"
            ) from None
    elif not ctype:
        raise ApiError(
            415, "unsupported_media_type", "no Content-Type; send multipart/form-data or application/json"
        )
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype!r}; send multipart/form-data or application/json",
        )
    image_field = "image" if ctype == "multipart/form-data" else "image_base64"
    unknown = sorted(set(raw) - _OPTIONS - {image_field})
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}", unknown[0])
    if "instruction" not in raw:
        raise ApiError(422, "missing_field", "field 'instruction' is required", "instruction")
    return _Parsed(
        image_bytes=image_bytes,
        instruction=_check_instruction(raw["instruction"], settings),
        conversation_id=_parse_conversation_id(raw.get("conversation_id")),
        return_overlay=_parse_bool(raw.get("return_overlay", False), "return_overlay"),
        return_masks=_parse_bool(raw.get("return_masks", True), "return_masks"),
    )


# ----------------------------------------------------------------------------------------- middleware


class _BodyLimit:
    """Reads a request body up to a byte limit before the app sees it; larger bodies get a JSON 413.

    ``Content-Length`` is checked first; chunked bodies are counted as they arrive.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = _error_response(413, "body_too_large", f"the request body exceeds {self.limit} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                    return
                if declared > self.limit:
                    await too_big(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


# ----------------------------------------------------------------------------------------- conversations


@dataclass
class _Conversation:
    image_key: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # the most recent exchanges only
    exchanges: int = 0  # all exchanges so far


class _Conversations:
    """Conversation histories by id, least recently used forgotten first (event-loop only, no locking)."""

    def __init__(self, capacity: int, max_turns: int) -> None:
        self.capacity, self.max_turns = capacity, max_turns
        self._items: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, cid: str) -> _Conversation | None:
        conv = self._items.get(cid)
        if conv is not None:
            self._items.move_to_end(cid)
        return conv

    def new(self, key: str) -> tuple[str, _Conversation]:
        cid = uuid.uuid4().hex
        conv = self._items[cid] = _Conversation(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return cid, conv

    def append(self, conv: _Conversation, user: str, assistant: str) -> None:
        conv.turns.extend([("user", user), ("assistant", assistant)])
        conv.exchanges += 1
        del conv.turns[: max(0, len(conv.turns) - 2 * self.max_turns)]


# ----------------------------------------------------------------------------------------- the app


def _load_examples() -> list[dict[str, str]]:
    index = EXAMPLES_DIR / "examples.json"
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    return [
        {**item, "url": f"/static/examples/{item['name']}"}
        for item in items
        if (EXAMPLES_DIR / item["name"]).is_file()
    ]


def create_app(
    predictor_factory: Callable[[], PredictorLike],
    settings: ServeSettings | None = None,
    *,
    model_name: str | None = None,
    use_predict_batch: bool = True,
) -> FastAPI:
    """Build the API + page application.

    Args:
        predictor_factory: returns a new predictor over the loaded model, e.g.
            ``lambda: ReasonSegPredictor(model)``; called once per distinct image (the image-encoder cache
            keeps up to ``settings.cache_bytes`` of encoded images).
        settings: limits and options (defaults: :class:`ServeSettings`).
        model_name: shown in ``/healthz`` and in every result.
        use_predict_batch: False runs queued requests one model call each (the batch-size-1 baseline).
    """
    settings = settings or ServeSettings()
    engine = SegmentEngine(predictor_factory, settings.cache_bytes, use_predict_batch=use_predict_batch)
    queue: BatchQueue[SegmentJob, JobResult] = BatchQueue(
        engine.run,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
    )
    conversations = _Conversations(settings.max_conversations, settings.max_history_turns)
    examples = _load_examples()
    decode_slots = asyncio.Semaphore(4)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        try:
            yield
        finally:
            await queue.stop()

    app = FastAPI(
        title="reasonseg",
        summary="Reasoning segmentation: image + instruction -> answer and masks",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.queue = queue

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        response = _error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(
            500, "internal_error", f"the model failed on this request ({type(exc).__name__})"
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error_response(422, "invalid_field", str(first.get("msg")), loc or None)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    def _authorize(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.token.encode()
        ):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness, queue and cache counters."""
        cache = engine.cache.stats()
        return {
            "status": "ok",
            "model": model_name,
            "queue": {"waiting": queue.waiting, **queue.stats.as_dict()},
            "cache": asdict(cache),
            "conversations": len(conversations),
        }

    @app.get("/v1/examples", response_model=list[ExampleOut], tags=["segment"], responses={401: _ERRORS[401]})
    async def list_examples(request: Request) -> list[dict[str, str]]:
        """The bundled example photos with a suggested instruction each."""
        _authorize(request)
        return examples

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        tags=["segment"],
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": _request_schemas(settings),
            }
        },
    )
    async def segment(request: Request) -> JSONResponse:
        """Segment what the instruction asks for; see the module docstring for the two body formats."""
        t_start = time.perf_counter()
        _authorize(request)
        parsed = await _parse_request(request, settings)
        conv = None
        if parsed.conversation_id is not None:
            conv = conversations.get(parsed.conversation_id)
            if conv is None:
                raise ApiError(
                    404, "unknown_conversation", "conversation_id is unknown or expired", "conversation_id"
                )
        async with decode_slots:  # bounds the memory of images being decoded at once
            image = await run_in_threadpool(decode_image_bytes, parsed.image_bytes, settings)
            key = await run_in_threadpool(image_key, image)
        if conv is not None and conv.image_key != key:
            raise ApiError(
                409, "conversation_image_mismatch",
                "this conversation is about another image; send the same image or start a new conversation",
                "image",
            )  # fmt: skip
        t_decoded = time.perf_counter()
        job = SegmentJob(
            image=image, key=key, instruction=parsed.instruction, history=list(conv.turns) if conv else []
        )
        try:
            done = await queue.submit(
                job, timeout_s=max(0.001, settings.request_timeout_s - (t_decoded - t_start))
            )
        except QueueFullError as exc:
            raise ApiError(503, "queue_full", str(exc)) from None
        except PromptTooLongError as exc:
            raise ApiError(400, "prompt_too_long", str(exc), "instruction") from None
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {settings.request_timeout_s} s") from None
        t_model = time.perf_counter()
        response = await run_in_threadpool(
            _render, done, parsed, image, {
                "decode": (t_decoded - t_start) * 1e3,
                "queue_and_model": (t_model - t_decoded) * 1e3,
                "encode_image": done.encode_s * 1e3,
                "model_call": done.predict_s * 1e3,
            }, model_name,
        )  # fmt: skip
        if conv is None:
            cid, conv = conversations.new(key)
        else:
            cid = parsed.conversation_id or ""
        conversations.append(conv, parsed.instruction, response["answer"])
        response["timings_ms"]["total"] = round((time.perf_counter() - t_start) * 1e3, 3)
        response.update(conversation_id=cid, turn=conv.exchanges, cache_hit=done.cache_hit,
                        batch_size=done.batch_size)  # fmt: skip
        return JSONResponse(response)

    if settings.enable_page:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.add_middleware(_BodyLimit, limit=settings.max_upload_bytes * 4 // 3 + 64 * 1024)
    return app


def _render(
    done: JobResult, parsed: _Parsed, image: np.ndarray, timings_ms: dict[str, float], model_name: str | None
) -> dict[str, Any]:
    from reasonseg.inference.outputs import SegmentResult

    result = SegmentResult.from_prediction(
        done.prediction, parsed.instruction, image.shape[:2], timings_ms=timings_ms, model=model_name
    )
    out = result.to_json(include_masks=parsed.return_masks)
    out["overlay_png_base64"] = None
    if parsed.return_overlay:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(result.overlay(image)).save(buf, format="PNG", compress_level=3)
        out["overlay_png_base64"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return out


def _version() -> str:
    from reasonseg import __version__

    return __version__
