"""The web labelling app (FastAPI): server-rendered pages, a little JavaScript, a JSON API.

Pages: ``/login``, ``/label`` (the paper's protocol: a prompt and three images, each good / bad /
skip), ``/pairs`` (two images of one prompt: left, right or tie), ``/stats`` (admin). Any prompt
text, and images of any size: small ones are scaled up pixel by pixel, large ones scaled down
smoothly, the aspect ratio kept. Images are served from ``/images/<sha256>.png`` to logged-in users
only.

API (JSON; authenticate with the session cookie that ``/login`` sets, or ``Authorization: Bearer
TOKEN``)::

    GET  /api/next?mode=images|pairs   -> {"items": [{"id", "src", "width", "height"}], "prompt", "task",
                                           "progress"}   (task "" for a free-text prompt)
    POST /api/labels       {"generation_id": 12, "value": "good"|"bad"|"skip", "request_id": "..."}
                           -> {"id": label id, "duplicate": false}
    POST /api/comparisons  {"left": 12, "right": 13, "choice": "left"|"right"|"tie", "request_id": "..."}
    POST /api/undo         {"mode": "images"|"pairs"} -> {"undone": {...} or null, "progress"}
    GET  /api/progress, /api/stats (admin), /api/health

Errors are JSON ``{"error": "..."}`` with a 4xx status (HTML pages for a browser's page requests);
bodies over ``MAX_BODY`` bytes get 413; unexpected failures a bare 500 with no traceback. A label is
committed to the database before its request is answered. Progress (which counts every label) comes
with ``/api/next`` and ``/api/undo``, once a screen, not with every label.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import urllib.parse
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from t2ialign.feedback.labelling import LabelError
from t2ialign.feedback.store import FeedbackStore

MAX_BODY = 64 * 1024
COOKIE = "t2ialign_token"
HERE = Path(__file__).parent
_SHA_PNG = re.compile(r"^[0-9a-f]{64}\.png$")
log = logging.getLogger("t2ialign.feedback.app")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_ID = Field(ge=1, le=2**62)


class LabelIn(_Strict):
    generation_id: StrictInt = _ID
    value: Literal["good", "bad", "skip"]
    request_id: str | None = Field(default=None, max_length=128)


class ComparisonIn(_Strict):
    left: StrictInt = _ID
    right: StrictInt = _ID
    choice: Literal["left", "right", "tie"]
    request_id: str | None = Field(default=None, max_length=128)


class UndoIn(_Strict):
    mode: Literal["images", "pairs"] = "images"


class _TooLarge(HTTPException):
    """Raised while reading a body past the limit (an HTTPException, so FastAPI passes it on)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before the app reads
    them (declared Content-Length) or as soon as they pass the limit (chunked bodies)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await _send_json(send, 400, "Content-Length is not a number")
            if n > self.limit:
                return await _send_json(send, 413, f"request body too large (limit {self.limit} bytes)")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, f"request body too large (limit {self.limit} bytes)")


class SecurityHeaders:
    """ASGI middleware: the ``SECURITY_HEADERS`` on every response (cheaper than an HTTP middleware)."""

    _extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {
                    **msg,
                    "headers": [*msg.get("headers", []), *(h for h in self._extra if h[0] not in have)],
                }
            await send(msg)

        await self.app(scope, receive, send_with_headers)


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _clean(x):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _fmt(x, spec: str = ".2f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _json_script(x) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(x).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _pct(a: float, b: float) -> float:
    return 100.0 * a / b if b else 0.0


def create_app(project: str | Path, max_body: int = MAX_BODY) -> FastAPI:
    """The labelling app for the feedback project in folder ``project``."""
    store = FeedbackStore.open(project)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    env.globals["pct"] = _pct
    project_name = Path(project).resolve().name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    app = FastAPI(
        title="t2ialign labelling", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.store = store
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=max_body)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        html = env.get_template(name).render(project=project_name, **ctx)
        return HTMLResponse(html, status_code=status)

    def token_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(COOKIE)

    def who(request: Request) -> tuple[str, dict | None] | None:
        token = token_of(request)
        if not token:
            return None
        if store.check_admin(token):
            return ("admin", None)
        ann = store.annotator_by_token(token)
        return ("annotator", ann) if ann else None

    def annotator(request: Request) -> dict:
        w = who(request)
        if w is None:
            raise HTTPException(401, "log in first: a missing, wrong or revoked token")
        if w[0] != "annotator":
            raise HTTPException(403, "only annotators label; the admin token opens the stats page")
        return w[1]

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")

    # ------------------------------------------------------------- errors

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"not found: {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        if exc.status_code == 401 and wants_html(request):
            return RedirectResponse("/login", status_code=303)
        if wants_html(request):
            return page("error.html", status=exc.status_code, status_code=exc.status_code, message=msg)
        return JSONResponse({"error": msg}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                parts.append("the body is not valid JSON")
                continue
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse({"error": "malformed request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(LabelError)
    async def label_error(request: Request, exc: LabelError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)

    # ------------------------------------------------------------- pages

    @app.get("/")
    def index(request: Request):
        w = who(request)
        if w is None:
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse("/stats" if w[0] == "admin" else "/label", status_code=303)

    @app.get("/login")
    def login_page(request: Request):
        return page("login.html", error=None)

    # the form body is read by hand (no python-multipart); documented here for the schema only
    login_form = {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}
    login_body = {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": login_form}}}

    @app.post("/login", openapi_extra={"requestBody": login_body})
    async def login(request: Request):
        body = (await request.body()).decode("utf-8", errors="replace")
        token = (urllib.parse.parse_qs(body).get("token") or [""])[0].strip()
        role = (
            "admin"
            if store.check_admin(token)
            else ("annotator" if store.annotator_by_token(token) else None)
        )
        if role is None:
            return page("login.html", status=401, error="That token is not valid. Ask the project admin.")
        resp = RedirectResponse("/stats" if role == "admin" else "/label", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return resp

    @app.post("/logout")
    def logout():
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/label")
    def label_page(request: Request):
        ann = annotator(request)
        state = next_state(ann, "images")
        return page(
            "label.html", user=ann["name"], mode="images", state=state, state_json=_json_script(state)
        )

    @app.get("/pairs")
    def pairs_page(request: Request):
        ann = annotator(request)
        state = next_state(ann, "pairs")
        return page("pairs.html", user=ann["name"], mode="pairs", state=state, state_json=_json_script(state))

    @app.get("/stats")
    def stats_page(request: Request):
        w = who(request)
        if w is None:
            raise HTTPException(401, "log in with the admin token")
        if w[0] != "admin":
            raise HTTPException(403, "the stats page needs the admin token")
        from t2ialign.feedback.stats import project_stats

        return page("stats.html", user="admin", mode="stats", s=project_stats(store))

    @app.get("/images/{name:path}")
    def image(name: str, request: Request):
        if who(request) is None:
            raise HTTPException(401, "log in to see images")
        if not _SHA_PNG.match(name):
            raise HTTPException(404, f"no image {name!r}: image names are a SHA-256 and .png")
        sha = name[:-4]
        known = store._conn().execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone()
        path = store.image_path(sha)
        if not known or not path.is_file():
            raise HTTPException(404, f"no image {name!r} in this project")
        return FileResponse(
            path, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000"}
        )

    # ------------------------------------------------------------- API

    def item(gid: int) -> dict:
        g = store.generation(gid)
        sha = g["image_sha256"]
        w, h = store._conn().execute("SELECT width, height FROM images WHERE sha256 = ?", (sha,)).fetchone()
        return {"id": gid, "src": f"/images/{sha}.png", "width": w, "height": h}

    def next_state(ann: dict, mode: str) -> dict:
        if mode == "images":
            ids = store.next_images(ann["id"], 3)
        else:
            pair = store.next_pair(ann["id"])
            ids = list(pair) if pair else []
        out = {"mode": mode, "items": [item(g) for g in ids], "progress": store.progress(ann["id"])}
        if ids:
            g = store.generation(ids[0])
            task = "" if g["task"] == "other" else g["task"].replace("_", " ")  # free text: no task
            out.update(prompt=g["prompt"], task=task)
        else:
            out.update(prompt=None, task=None, done=True)
        return out

    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.get("/api/next")
    def api_next(request: Request, mode: Literal["images", "pairs"] = "images"):
        return next_state(annotator(request), mode)

    @app.get("/api/progress")
    def api_progress(request: Request):
        ann = annotator(request)
        return {"annotator": ann["name"], **store.progress(ann["id"])}

    @app.post("/api/labels")
    def api_label(body: LabelIn, request: Request):
        ann = annotator(request)
        res = store.add_label(
            body.generation_id,
            ann["id"],
            body.value,
            request_id=body.request_id,
            source="app",
            enforce_assignment=True,
        )
        return res

    @app.post("/api/comparisons")
    def api_comparison(body: ComparisonIn, request: Request):
        ann = annotator(request)
        res = store.add_comparison(
            body.left,
            body.right,
            ann["id"],
            body.choice,
            request_id=body.request_id,
            source="app",
            enforce_assignment=True,
        )
        return res

    @app.post("/api/undo")
    def api_undo(body: UndoIn, request: Request):
        ann = annotator(request)
        if body.mode == "images":
            undone = store.undo_last_label(ann["id"])
        else:
            undone = store.undo_last_comparison(ann["id"])
        return {"undone": undone, "progress": store.progress(ann["id"])}

    @app.get("/api/stats")
    def api_stats(request: Request):
        w = who(request)
        if w is None or w[0] != "admin":
            raise HTTPException(401 if w is None else 403, "the stats need the admin token")
        from t2ialign.feedback.stats import project_stats

        return JSONResponse(_clean(project_stats(store)))

    return app


def serve(project: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn (one process; SQLite serialises the writes)."""
    import uvicorn

    app = create_app(project)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
