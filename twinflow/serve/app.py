"""The HTTP API of ``twinflow serve`` and the viewer page it hosts.

Answers are msgspec structs (schemas/serve.py) encoded once; their JSON Schemas are
the OpenAPI document's components, so the document describes exactly what is sent.
Every refusal is an :class:`~schemas.serve.ApiError` naming the field to blame.
"""

from __future__ import annotations

import asyncio
import getpass
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from connectors.questdb import QuestDBError, QuestDBHttp
from schemas import control
from schemas.outputs import Alarm
from schemas.serve import (
    ApiError,
    EntityView,
    PlantNode,
    SeriesView,
    SetpointBody,
    VerdictBody,
)
from twinflow import metrics, operations
from twinflow.errors import TwinflowError
from twinflow.plant import PlantView
from twinflow.serve import history
from twinflow.serve.live import LiveTwin, sse_event
from twinflow.settings import Settings
from twinflow.tables import tables

STATIC_DIR = Path(__file__).resolve().parent / "static"
API = "/api/v1"
TOKEN_COOKIE = "twinflow_token"  # noqa: S105 - the cookie's name
_HOUR_MS = 3_600_000
KEEPALIVE_S = 15.0

Role = Literal["viewer", "operator"]
T = TypeVar("T")


class Refused(Exception):
    """A request twinflow will not serve: its HTTP status, why, and the field to blame."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = ApiError(detail=detail, field=field)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as their token says."""

    name: str
    role: Role


@dataclass(slots=True)
class _Built:
    """An encoded answer and the view version it was built from."""

    version: int
    answer: bytes


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _json(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json")


def create_app(settings: Settings, live: LiveTwin, vendor_dir: Path | None = None) -> FastAPI:
    """The API and the page over ``live``; ``live`` starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(live.start)
        try:
            yield
        finally:
            await asyncio.to_thread(live.stop)

    app = FastAPI(
        title="twinflow serve",
        version="1",
        description=(
            "The live twin of the plant: hierarchy, entities, alarms, setpoints and "
            "history. Current state is read from twin.state and twin.alarms; history "
            "from QuestDB."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=f"{API}/openapi.json",
    )
    sql = QuestDBHttp(settings.questdb, timeout_s=10.0)
    names = tables(settings.questdb.table_prefix)
    serve = settings.serve
    tokens: dict[str, Caller] = {}
    if serve.token is not None:
        tokens[serve.token.get_secret_value()] = Caller("operator", "operator")
    for user_name, user in serve.users.items():
        tokens[user.token.get_secret_value()] = Caller(user_name, user.role)
    # Answers encoded once per change: reads outnumber changes by far.
    plant_cache = _Built(version=-1, answer=b"")
    entity_cache: dict[str, tuple[tuple[int, int], bytes]] = {}
    open_paths = {f"{API}/openapi.json", f"{API}/health"}
    anyone = Caller(getpass.getuser(), "operator")  # every caller of an open server

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> Response:
        return _json(exc.error, exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ())]
        field = location[-1] if location else None
        where = ".".join(location)
        return _json(ApiError(detail=f"{where}: {first.get('msg')}", field=field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _json(ApiError(detail=str(exc.detail)), exc.status_code)

    def caller(request: Request, need: Role = "viewer") -> Caller:
        if not serve.secured:
            return anyone
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        token = token or request.cookies.get(TOKEN_COOKIE)
        found = _match(tokens, token)
        if found is None:
            raise Refused(
                401,
                "a valid token is required (Authorization: Bearer, or the twinflow_token cookie)",
            )
        if need == "operator" and found.role != "operator":
            raise Refused(403, f"{found.name} is a viewer; only operators may do this")
        return found

    def entity_or_404(view: PlantView, entity_id: str) -> None:
        if entity_id not in view.model.by_id:
            raise Refused(404, f"no entity {entity_id!r} in the twin model", "id")

    # Checked around the application (see `served`), before routing.
    app.state.token_check = caller if serve.secured else None
    app.state.open_paths = open_paths

    @app.get(f"{API}/plant", **_doc(PlantNode, "The plant tree with rolled-up status."))
    async def plant() -> Response:
        def encoded(view: PlantView) -> bytes:
            # Never older than the view: a page that reads the tree after an event must
            # not see the state before it.
            if plant_cache.version != view.version or not plant_cache.answer:
                plant_cache.version = view.version
                plant_cache.answer = msgspec.json.encode(view.tree())
            return plant_cache.answer

        return Response(live.read(encoded), media_type="application/json")

    @app.get(
        f"{API}/entities/{{id}}",
        **_doc(EntityView, "The current twin of one entity.", 404),
    )
    async def entity(id: str) -> Response:
        def answer(view: PlantView) -> bytes:
            entity_or_404(view, id)
            key = (view.entity_versions.get(id, 0), view.windows_version)
            cached = entity_cache.get(id)
            if cached is None or cached[0] != key:
                cached = entity_cache[id] = (key, msgspec.json.encode(view.entity(id)))
            return cached[1]

        return Response(live.read(answer), media_type="application/json")

    @app.get(
        f"{API}/entities/{{id}}/series",
        **_doc(SeriesView, "A sensor's history from QuestDB, bucketed.", 404, 503),
    )
    def series(
        id: str,
        sensor: Annotated[str, Query(description="a sensor of the entity")],
        from_ms: Annotated[
            int | None, Query(alias="from", ge=0, description="epoch ms; default: to - 1 h")
        ] = None,
        to_ms: Annotated[
            int | None, Query(alias="to", ge=0, description="epoch ms; default: now")
        ] = None,
        points: Annotated[
            int | None, Query(ge=2, description="most buckets (capped by serve.max_points)")
        ] = None,
    ) -> Response:
        model = live.view.model
        entity_or_404(live.view, id)
        specs = model.sensors_of(id)
        if sensor not in specs:
            known = ", ".join(specs)
            raise Refused(422, f"{id} has no sensor {sensor!r}; its sensors: {known}", "sensor")
        end = to_ms if to_ms is not None else _now_ms()
        start = from_ms if from_ms is not None else max(0, end - _HOUR_MS)
        if start >= end:
            raise Refused(422, f"from ({start}) must be before to ({end})", "from")
        wanted = min(points or serve.max_points, serve.max_points)
        try:
            view = history.series(
                sql,
                names,
                entity=id,
                sensor=sensor,
                unit=specs[sensor].unit,
                from_ms=start,
                to_ms=end,
                points=wanted,
            )
        except QuestDBError as exc:
            raise Refused(503, f"history is unavailable: {exc}") from None
        return _json(view)

    @app.get(f"{API}/alarms", **_doc(list[Alarm], "Alarms, each as its latest event says."))
    async def alarms(
        state: Annotated[
            Literal["active", "ended", "all"], Query(description="which alarms")
        ] = "active",
        entity: Annotated[str | None, Query(description="only this entity's")] = None,
    ) -> Response:
        if entity is not None and entity not in live.view.model.by_id:
            raise Refused(422, f"no entity {entity!r} in the twin model", "entity")
        active = {"active": True, "ended": False, "all": None}[state]
        return _json(live.read(lambda view: view.alarm_list(active=active, entity_id=entity)))

    def judge(alarm_id: str, verdict: control.Verdict, request: Request, body: bytes) -> Response:
        who = caller(request, "operator")
        _require_json(request)
        text = _body(body, VerdictBody) if body.strip() else VerdictBody()
        alarm = live.read(lambda view: view.alarms.get(alarm_id))
        if alarm is None:
            raise Refused(404, f"no alarm {alarm_id!r} (GET {API}/alarms lists them)", "id")
        if not alarm.active:
            raise Refused(409, f"alarm {alarm_id} has ended; a verdict applies to an active one")
        user = text.user if (text.user and not serve.secured) else who.name
        feedback = control.Feedback(
            feedback_id=str(uuid.uuid4()),
            alarm_id=alarm_id,
            entity_id=alarm.entity_id,
            verdict=verdict,
            user=user,
            ts_ms=_now_ms(),
            note=text.note,
        )
        _send(
            lambda: operations.send(
                settings, settings.topics.feedback, feedback.entity_id, control.encode(feedback)
            )
        )
        return _json(feedback, 202)

    for verdict in control.Verdict:
        _add_verdict_route(app, verdict, judge)

    @app.put(
        f"{API}/entities/{{id}}/setpoints/{{name}}",
        **_doc(
            control.Command,
            "Send a setpoint command (checked against the twin model) to twin.commands.",
            404,
            body=SetpointBody,
            ok=202,
        ),
    )
    async def setpoint(id: str, name: str, request: Request) -> Response:
        who = caller(request, "operator")
        _require_json(request)
        body = _body(await request.body(), SetpointBody)
        entity_or_404(live.view, id)
        if name not in live.view.model.setpoints_of(id):
            known = ", ".join(live.view.model.setpoints_of(id)) or "none"
            raise Refused(404, f"{id} has no setpoint {name!r}; its setpoints: {known}", "name")
        expires_s = serve.command_expires_s if body.expires_s is None else body.expires_s
        if not (0 < expires_s <= 86_400):
            raise Refused(422, "expires_s must be in (0, 86400] seconds", "expires_s")
        text = body.value if isinstance(body.value, str) else _text(body.value)
        user = body.user if (body.user and not serve.secured) else who.name
        try:
            command = operations.make_command(live.view.model, id, name, text, user, expires_s)
        except operations.RefusedError as exc:
            raise Refused(422, str(exc), "value") from None
        await asyncio.to_thread(
            _send,
            lambda: operations.send_command(settings, command),
        )
        return _json(command, 202)

    @app.get(
        f"{API}/events",
        summary="Server-Sent Events: `ready` first, then `state` (StateEvent) and `alarm` "
        "(Alarm) as they happen; a client too slow to keep up is disconnected (an "
        "EventSource reconnects and gets `ready` again: read the plant afresh then).",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "an endless event stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def events() -> StreamingResponse:
        queue = live.subscribe()
        metrics.serve_sse_clients.inc()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield sse_event("ready", {"caught_up": live.caught_up})
                while True:
                    try:
                        chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keepalive\n\n"  # keeps proxies from closing an idle stream
                        continue
                    chunks = [chunk]
                    while chunks[-1] is not None and not queue.empty():
                        chunks.append(queue.get_nowait())
                    yield b"".join(c for c in chunks if c is not None)
                    if chunks[-1] is None:
                        return
            finally:
                live.unsubscribe(queue)
                metrics.serve_sse_clients.dec()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get(f"{API}/health", include_in_schema=False)
    def health() -> Response:
        # Open to all (a service manager probes it): booleans only, the reasons are logged.
        return _json(
            {
                "caught_up": live.caught_up,
                "kafka_ok": live.reader_error is None,
                "questdb_ok": live.questdb_error is None,
            }
        )

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if vendor_dir is not None and vendor_dir.is_dir():
        app.mount("/vendor", StaticFiles(directory=vendor_dir), name="vendor")
    document = openapi_document(app)
    app.openapi = lambda: document  # type: ignore[method-assign]
    return app


def _add_verdict_route(
    app: FastAPI,
    verdict: control.Verdict,
    judge: Callable[[str, control.Verdict, Request, bytes], Response],
) -> None:
    async def route(id: str, request: Request) -> Response:
        body = await request.body()
        return await asyncio.to_thread(judge, id, verdict, request, body)

    app.post(
        f"{API}/alarms/{{id}}/{verdict.value}",
        name=f"alarm_{verdict.value}",
        **_doc(
            control.Feedback,
            f"{verdict.value.capitalize()} an active alarm (sent to twin.feedback).",
            404,
            409,
            body=VerdictBody,
            ok=202,
        ),
    )(route)


def served(app: FastAPI) -> ASGIApp:
    """What the server runs: ``app`` behind its token check, with requests measured.

    Both wrap the application rather than being added as its middleware: Starlette's
    middleware stack cost a quarter of a cached answer's time, even passing through.
    """
    guarded: ASGIApp = app
    if app.state.token_check is not None:
        guarded = _TokenGuard(app, app.state.token_check, app.state.open_paths)
    return _Measured(guarded)


class _Measured:
    """Counts and times API requests by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(API):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()

        async def answering(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Set by the router; a request refused before routing has none.
                route = getattr(scope.get("route"), "path", "unrouted")
                metrics.serve_request_seconds.labels(route).observe(time.perf_counter() - began)
                metrics.serve_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, answering)


class _TokenGuard:
    """Refuses API requests without a valid token before they are routed.

    Plain ASGI: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) adds tasks and
    memory streams to every request, and their cyclic garbage sets off full collections
    of the whole view (tens of ms each): it tripled the cost of a cached answer.
    """

    def __init__(
        self, app: ASGIApp, check: Callable[[Request], object], open_paths: set[str]
    ) -> None:
        self.app = app
        self.check = check
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(API) and path not in self.open_paths:
            try:
                self.check(Request(scope))
            except Refused as exc:
                await _json(exc.error, exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _match(tokens: dict[str, Caller], token: str | None) -> Caller | None:
    """The caller whose token equals ``token``, compared in constant time."""
    if not token:
        return None
    found = None
    for known, who in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = who
    return found


def _body(raw: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        # msgspec names the field as a path (`$.note`) or, when it is missing or
        # unknown, in backticks; without either, the body as a whole is wrong.
        named = re.search(r"\$\.(\w+)|field `(\w+)`", text)
        field = next(group for group in named.groups() if group) if named else "body"
        raise Refused(422, f"body: {text}", field) from None
    except msgspec.DecodeError as exc:
        raise Refused(400, f"body is not JSON: {exc}", "body") from None


def _require_json(request: Request) -> None:
    """Refuse a write whose body is not declared JSON.

    A page on another site can send a plain form or text POST to a server on loopback
    without asking; a JSON one needs a CORS preflight, which this server never grants.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(
            415,
            "send the body as JSON (Content-Type: application/json), even an empty one",
            "Content-Type",
        )


def _text(value: float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _send(send: Callable[[], None]) -> None:
    try:
        send()
    except TwinflowError as exc:
        raise Refused(503, f"Kafka did not take it: {exc}") from None


# -- the OpenAPI document ---------------------------------------------------------------

_REF = "#/components/schemas/{name}"
_KINDS: dict[str, Any] = {}
"""The msgspec types the document names, by a marker FastAPI can serialize."""


def _kind(kind: Any) -> str:
    name = getattr(kind, "__name__", None) if not hasattr(kind, "__args__") else str(kind)
    marker = str(name)
    _KINDS[marker] = kind
    return marker


def _doc(
    answer: Any,
    summary: str,
    *errors: int,
    body: type | None = None,
    ok: int = 200,
) -> dict[str, Any]:
    """Route keywords that document an answer, its errors and its body by schema."""
    responses: dict[int | str, dict[str, Any]] = {
        ok: {"description": "OK", "content": {"application/json": {"x-msgspec": _kind(answer)}}},
        401: _error_response("no or an unknown token"),
        422: _error_response("a parameter or the body is invalid; field names it"),
    }
    if body is not None:
        responses[403] = _error_response("the caller is not an operator")
        responses[400] = _error_response("the body is not JSON")
        responses[415] = _error_response("the body is not declared application/json")
    for status in errors:
        responses[status] = _error_response(
            {404: "not found", 409: "not possible in the current state", 503: "unavailable"}[status]
        )
    extra: dict[str, Any] = {}
    if body is not None:
        extra["requestBody"] = {
            "required": False,
            "content": {"application/json": {"x-msgspec": _kind(body)}},
        }
    return {
        "summary": summary,
        "status_code": ok,
        "responses": responses,
        "response_class": Response,
        "openapi_extra": extra,
    }


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"x-msgspec": _kind(ApiError)}},
    }


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with msgspec's schemas for answers and bodies, and 3.1 refs."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    media = list(_media(document))
    kinds = [_KINDS[place.pop("x-msgspec")] for place in media]
    (schemas, components) = msgspec.json.schema_components(kinds, ref_template=_REF)
    for place, schema in zip(media, schemas, strict=True):
        place["schema"] = schema
    document.setdefault("components", {})["schemas"] = dict(sorted(components.items()))
    for path in document["paths"].values():
        for operation in path.values():
            operation["responses"] = {
                str(code): value for code, value in sorted(operation["responses"].items())
            }
    return document


def _media(document: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every media object of the document that names a msgspec type."""
    for path in document["paths"].values():
        for operation in path.values():
            places = list(operation.get("responses", {}).values())
            if "requestBody" in operation:
                places.append(operation["requestBody"])
            for place in places:
                media = place.get("content", {}).get("application/json")
                if media is not None and "x-msgspec" in media:
                    yield media
