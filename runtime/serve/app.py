"""The ASGI app: routes, keys, errors and the access log at the edge; the schedulers underneath.

Starlette rather than FastAPI: the API is five routes whose validation must give OpenAI's error shapes
naming the input index, which a pydantic model would have to be bent to; Starlette is FastAPI's own core
(the same request path, minus pydantic and the OpenAPI generation), small and pure Python.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from embedrt.manifest import resolve_prompt
from embedrt.serve import protocol
from embedrt.serve.config import ServeConfig
from embedrt.serve.metrics import CONTENT_TYPE, Metrics
from embedrt.serve.protocol import ApiError
from embedrt.serve.scheduler import DropReason, Lane, Scheduler

log = logging.getLogger("embedrt.serve")
access_log = logging.getLogger("embedrt.serve.access")
JSON = "application/json"
TRUNCATED_HEADER = "X-Embedrt-Truncated-Inputs"
LANE_HEADER = "X-Embedrt-Lane"
TIMEOUT_HEADER = "X-Request-Timeout"
# request ids: a random prefix per process and a counter (uuid4 costs a getrandom call per request)
_ID_PREFIX = os.urandom(4).hex()
_IDS = itertools.count()
# a request with one text of at most this many characters (or ids) is tokenized on the event loop: a
# short text takes ~30 us, less than the two thread switches a hop to the edge threads costs under load
INLINE_TOKENIZE = 2048
# a request of more texts' characters than this is tokenized in its own edge thread (Service.edge_large)
LARGE_TEXT = 1 << 20
WARM_UP = ["warm up", "a somewhat longer warm-up text, so that a second shape is compiled and run once"]


class Served:
    """One model behind the API: its names, the model and its scheduler."""

    def __init__(self, name: str, aliases: set[str], model: Any, scheduler: Scheduler) -> None:
        self.name = name
        self.aliases = aliases
        self.model = model
        self.scheduler = scheduler


class Service:
    """The server's state: models, readiness, drain, metrics and the edge threads (tokenize, serialise)."""

    def __init__(self, sources: list[Any], config: ServeConfig, load_options: dict[str, Any]) -> None:
        self.config = config
        self._sources = sources
        self._load_options = load_options
        self.models: dict[str, Served] = {}
        self._by_alias: dict[str, Served] = {}
        self.metrics = Metrics(lambda: {name: s.scheduler for name, s in self.models.items()})
        self.ready = False
        self.draining = False
        self.drain_end: float | None = None  # time.monotonic() by which a drain answers everything
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving the requests
        self.started = time.time()
        # tokenizing and JSON happen here, never on the event loop; two threads keep one request's
        # tokenization from holding up a small one
        self.edge = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embedrt-edge")
        # requests of more than LARGE_TEXT characters are tokenized here, one at a time, so that a few of them
        # (a 16 MB text without a cut point takes ~25 s) cannot take both edge threads from everyone else
        self.edge_large = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedrt-edge-large")
        self.cutoff: asyncio.Event | None = None  # set when a drain runs out of time (made on the loop)

    # ---- life cycle ----

    def start(self) -> None:
        """Load (if given folders) and warm up every model, start its scheduler; then ready."""
        from embedrt.model import load

        models = [s if hasattr(s, "encode_tokens") else load(s, **self._load_options) for s in self._sources]
        for model, (name, aliases) in zip(models, served_names(models)):  # names that clash: before warming up
            _warm_up(model, self.config)
            self._add(model, name, aliases)
        self.ready = True
        log.info("embedrt serve: ready with %s", ", ".join(self.models))

    def _add(self, model: Any, name: str, aliases: set[str]) -> None:
        quant = (model.manifest.extra or {}).get("quantization") or {}
        if quant and not quant.get("batch_invariant", quant.get("method") == "static"):
            log.warning("embedrt serve: %s is int8 with a recipe that is not batch-invariant (%s): a text's "
                        "vector will depend on the other requests it shares a call with; serve a static "
                        "int8 export (--quantize static) instead", name, quant.get("method"))
        scheduler = Scheduler(model, self.config, self.metrics.on_call(name), self.metrics.on_drop(name),
                              bulk_model=self._bulk_instance(model))
        served = Served(name, aliases, model, scheduler)
        self.models[name] = served
        for alias in aliases:
            self._by_alias[alias] = served
        self.metrics.add_model(name)

    def _bulk_instance(self, model: Any) -> Any | None:
        """A second instance of ``model`` for the bulk lane (see ``ServeConfig.bulk_instance``), or None."""
        mode = self.config.bulk_instance
        if mode == "auto":
            mode = "separate" if str(getattr(model, "device", "")).startswith("openvino") else "shared"
        if mode == "shared" or not hasattr(model, "plan"):
            return None
        from embedrt.model import load

        # loaded as the model was, from what its plan says (the CLI hands over loaded models, without their
        # load options): the same device explicitly, with that backend's settings only
        plan = model.plan
        options: dict[str, Any] = {"device": model.device, "threads": plan.threads, "batch_cost": plan.batch_cost,
                                   "huge_pages": model.huge_pages is not None}
        if str(model.device).startswith("openvino"):
            options["performance_hint"] = str(plan.openvino_config.get("PERFORMANCE_HINT", "LATENCY")).lower()
            options["openvino_cache_dir"] = plan.openvino_cache_dir
            if plan.inference_precision:  # both lanes compute alike, whatever the first load was asked
                options["inference_precision"] = plan.inference_precision
        else:
            options["spinning"] = plan.spinning
        bulk = load(model.path, **options)
        _warm_up(bulk, self.config)
        log.info("embedrt serve: %s has a second instance for the bulk lane", model.path)
        return bulk

    def begin_drain(self) -> None:
        """Stop taking work: /ready turns false and new embedding requests get 503; queued work finishes.

        Requests still unanswered ``drain_timeout`` s later (less a margin for writing the answers, so the
        process exits within it) get a 503 ``draining``. Safe to call from a signal handler or any thread.
        """
        if self.draining:
            return
        log.info("embedrt serve: draining")
        self.draining = True
        self.drain_end = time.monotonic() + self.config.drain_timeout
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing is waiting
                self.loop.call_soon_threadsafe(self.loop.call_later, self.config.drain_timeout - self._exit_margin(),
                                               self._cut_off)

    def _exit_margin(self) -> float:
        """What of ``drain_timeout`` is kept for answering and exiting after the cut-off."""
        return min(1.0, self.config.drain_timeout / 4)

    def _cut_off(self) -> None:
        """The drain ran out of time: answer every request still waiting with a 503 (from any thread)."""
        error = self.cut_off_error()
        if self.loop is not None and self.cutoff is not None:  # requests still tokenizing
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits on it
                self.loop.call_soon_threadsafe(self.cutoff.set)
        for served in self.models.values():
            count = served.scheduler.abandon(error)
            if count:
                log.warning("embedrt serve: %s: %d requests unanswered at the drain timeout got 503",
                            served.name, count)

    def cut_off_error(self) -> ApiError:
        return protocol.unavailable("The server shut down before answering this request (its drain timeout of "
                                    f"{self.config.drain_timeout:g} s ran out); retry it.", "draining")

    async def before_cut_off(self, work: Awaitable[Any]) -> Any:
        """``await work``, or a 503 ``draining`` if the drain runs out of time first."""
        task = asyncio.ensure_future(work)
        if self.cutoff is None:
            return await task
        cut = asyncio.ensure_future(self.cutoff.wait())
        try:
            done, _ = await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if task not in done:
            task.cancel()
            raise self.cut_off_error()
        return task.result()

    def stop(self) -> None:
        """Drain (finish queued work, within ``drain_timeout`` of the drain's start) and stop the workers."""
        self.begin_drain()
        end = self.drain_end if self.drain_end is not None else time.monotonic() + self.config.drain_timeout
        end -= self._exit_margin()  # the process still has to exit (0.4 s here with a call still running)
        for served in self.models.values():
            if not served.scheduler.close(max(0.1, end - time.monotonic())):
                log.warning("embedrt serve: %s did not drain within %g s", served.name, self.config.drain_timeout)
        self._cut_off()  # a host server that did not wait for its requests: answer what is left
        self.edge.shutdown(wait=False, cancel_futures=True)
        self.edge_large.shutdown(wait=False, cancel_futures=True)
        # the access log may be buffered (embedrt.serve.accesslog); uvicorn ends the process by re-raising
        # the signal, which skips logging's exit hooks, so its last lines are written here
        for handler in access_log.handlers:
            handler.flush()

    def lookup(self, name: str) -> Served:
        served = self._by_alias.get(name)
        if served is None:
            raise protocol.model_not_found(name, sorted(self.models))
        return served

    def check_open(self) -> None:
        if self.draining:
            raise protocol.unavailable("The server is shutting down.", "draining")
        if not self.ready:
            raise protocol.unavailable("The server is still loading its models.", "not_ready")

    def authorize(self, request: Request) -> None:
        """Accept a request carrying one of the keys (constant-time compare, every key tried)."""
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.config.api_keys:
            ok |= hmac.compare_digest(given, key.encode())
        if not ok:
            raise protocol.unauthorized()


def served_names(models: list[Any]) -> list[tuple[str, set[str]]]:
    """Each model's served name and the names it answers to.

    A model answers to its folder's name, its catalogue name and its hub id (a local checkpoint path would
    only leak the exporting machine's layout). The folder name is the one the command line gave, so it is
    the model's own: another model's catalogue name or hub id never takes it. A catalogue name or hub id
    that two models share (an fp32 and an int8 export of one checkpoint) is left to no one but a model
    whose folder bears it, and the others are served under their folder names.

    Raises:
        ValueError: two folders of one name (which would leave one of them without a name of its own).
    """
    folders = [Path(m.path).resolve().name for m in models]  # `embedrt serve .` too
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise ValueError(f"two served model folders are named {', '.join(twice)}; a folder's name is how a "
                         "request picks it, so serve folders of distinct names")
    weak = []
    for model in models:
        source = model.manifest.source or {}
        catalogue = source.get("catalogue")
        source_id = str(source.get("id") or "")
        weak.append((catalogue, {n for n in (catalogue, source_id) if n and not os.path.isabs(n)}))
    shared = collections.Counter(n for _, names in weak for n in names)
    out = []
    for folder, (catalogue, names) in zip(folders, weak):
        own = {n for n in names if (shared[n] == 1 and n not in folders) or n == folder}
        name = catalogue if catalogue in own else folder
        out.append((name, own | {folder}))
    return out


def _warm_up(model: Any, config: ServeConfig) -> None:
    """Run a model once at each size it will see, so that /ready means full speed and steady memory.

    Two short texts (first shapes, thread pools), then one call as large as the token budget allows:
    the backend's buffers for the largest activations are allocated now, not at the first big batch
    under load (which showed as +13% RSS late in a soak). Then wait for the weights' move into huge pages.
    """
    model.encode(WARM_UP)
    model.encode(WARM_UP[:1])
    budget = model.batch_cost(config.max_batch_tokens).token_budget
    length = int(model.manifest.max_seq_length)
    if budget:
        rows = max(1, min(config.max_batch_inputs, budget // length))
        model.encode(["warm up " * length] * rows, batch_size=rows, max_tokens=budget)
    if getattr(model, "huge_pages", None) is not None:
        model.huge_pages.wait(60)


# ---- the edge ----

Handler = Callable[[Service, Request, dict[str, Any]], Awaitable[Response]]


def _request_id(request: Request) -> str:
    """The client's ``X-Request-Id``, else one made up (this process's prefix and a counter)."""
    return request.headers.get("x-request-id") or f"{_ID_PREFIX}{next(_IDS):08x}"


def _endpoint(service: Service, path: str, handler: Handler, *, open_: bool = False) -> Callable[..., Any]:
    """Wrap a handler: key check, errors in OpenAI's shape, metrics and one access-log line."""

    async def endpoint(request: Request) -> Response:
        start = time.monotonic()
        info: dict[str, Any] = {}
        request_id = _request_id(request)
        try:
            if not open_:
                service.authorize(request)
            response = await handler(service, request, info)
        except ApiError as exc:
            info["error"] = exc.code
            response = Response(exc.body(), exc.status, headers=exc.headers, media_type=JSON)
        except ClientDisconnect:  # gone while sending the body: nobody reads an answer, and it is not ours
            info.update(status=499, error="client_disconnected")
            response = Response(status_code=499)
        except Exception as exc:  # answer, log and count it rather than let the server print a bare 500
            log.exception("unexpected error on %s", path)
            error = ApiError(500, f"Internal error: {type(exc).__name__}", type="server_error", code="internal")
            info["error"] = error.code
            response = Response(error.body(), 500, media_type=JSON)
        response.headers["X-Request-Id"] = request_id
        seconds = time.monotonic() - start
        status = int(info.pop("status", response.status_code))
        service.metrics.requests.labels(path, str(status)).inc()
        service.metrics.request_seconds.labels(path).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = request.client
            line = {"ts": round(time.time(), 3), "id": request_id, "method": request.method, "path": path,
                    "status": status, "ms": round(1000 * seconds, 2),
                    "client": f"{client.host}:{client.port}" if client else None, **info}
            access_log.info(json.dumps(line, separators=(",", ":")))
        return response

    return endpoint


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.too_large(f"The body has {declared} bytes; this server takes at most {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.too_large(f"The body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


class _ClientGone(Exception):
    """The client hung up while its request was being prepared."""


async def _unless_gone(work: asyncio.Future[Any], request: Request, timeout: float) -> Any:
    """``work``'s result; ``_ClientGone`` if the client disconnects first, ``asyncio.TimeoutError`` past
    ``timeout``. Either way, or if this is cancelled (a drain's cut-off), a ``work`` not yet started never runs."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    if watcher in done:
        raise _ClientGone
    raise asyncio.TimeoutError


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read, so the next message is a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _unread(future: asyncio.Future[Any]) -> None:
    """A job's answer nobody will read: cancelled, or (a 504 the scheduler set meanwhile) marked as read, so
    that asyncio does not log "Future exception was never retrieved" at ERROR for it."""
    if not future.cancel() and not future.cancelled():
        future.exception()


def _deadline_seconds(request: Request, default: float) -> float:
    raw = request.headers.get(TIMEOUT_HEADER.lower())
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise protocol.bad_request(f"{TIMEOUT_HEADER} must be a number of seconds > 0, got {raw!r}.", TIMEOUT_HEADER)
    return min(value, default)


def _lane(request: Request, count: int, config: ServeConfig) -> Lane:
    """The request's lane by its input count, or the header's; a request too large for interactive goes bulk
    (and so does one of too many tokens, once tokenized: see ``embeddings``)."""
    raw = request.headers.get(LANE_HEADER.lower())
    small = count <= config.interactive_max_inputs
    if raw is None:
        return Lane.INTERACTIVE if small else Lane.BULK
    try:
        lane = Lane(raw.lower())
    except ValueError:
        raise protocol.bad_request(f"{LANE_HEADER} must be interactive or bulk, got {raw!r}.", LANE_HEADER) from None
    # the header may move a small request to the bulk lane, never a large one ahead of the queries
    return lane if small else Lane.BULK


def _tokenize(model: Any, parsed: protocol.EmbeddingRequest) -> Any:
    try:
        if parsed.texts is not None:
            return model.tokenize_batch(parsed.texts, prompt_name=parsed.prompt_name, prompt=parsed.prompt)
        return model.tokenize_ids(parsed.token_ids)
    except (TypeError, ValueError) as exc:  # an id outside the vocabulary: the message names the row
        message = str(exc).replace("token ids [", "input[")
        where = re.search(r"input\[\d+\]", message)
        raise protocol.bad_request(message, where.group(0) if where else "input") from None


def _small(parsed: protocol.EmbeddingRequest) -> bool:
    """Whether the request is one short input, cheaper to tokenize on the loop than in an edge thread."""
    if parsed.count != 1:
        return False
    if parsed.texts is not None:
        return len(parsed.texts[0]) <= INLINE_TOKENIZE
    return parsed.token_ids is not None and len(parsed.token_ids[0]) <= INLINE_TOKENIZE


async def embeddings(service: Service, request: Request, info: dict[str, Any]) -> Response:
    arrival = time.monotonic()
    service.check_open()
    config = service.config
    timeout = _deadline_seconds(request, config.request_timeout)
    try:  # the deadline covers the upload too: a body sent a byte a second must not hold a connection forever;
        # so does a drain's cut-off (else uvicorn cancelled the upload at its own timeout: a reset, no 503)
        body = await service.before_cut_off(asyncio.wait_for(_read_body(request, config.max_body_bytes), timeout))
    except asyncio.TimeoutError:
        raise protocol.body_too_slow(timeout) from None
    loop = asyncio.get_running_loop()
    if len(body) > 65536:
        parsed = await loop.run_in_executor(service.edge, protocol.parse_embedding_request, body, config.max_inputs)
    else:
        parsed = protocol.parse_embedding_request(body, config.max_inputs)
    served = service.lookup(parsed.model)
    model = served.model
    info.update(model=served.name, inputs=parsed.count)
    if parsed.prompt_name is not None and parsed.prompt_name not in model.prompts:
        names = ", ".join(map(repr, sorted(model.prompts))) or "none"
        raise protocol.bad_request(f"'prompt_name' {parsed.prompt_name!r} is not one of the prompts of "
                                   f"'{served.name}' ({names}).", "prompt_name")
    try:  # what else the model refuses of a prompt (one its pooling would leave out), named by its parameter
        resolve_prompt(model.manifest, parsed.prompt_name, parsed.prompt)
    except ValueError as exc:
        raise protocol.bad_request(f"'{served.name}': {exc}.", "prompt" if parsed.prompt is not None
                                   else "prompt_name") from None
    if parsed.dimensions is not None and parsed.dimensions != model.dim:
        raise protocol.bad_request(f"'{served.name}' does not support 'dimensions' (it was not trained for "
                                   f"shortened embeddings; its dimension is {model.dim}).", "dimensions")
    lane = _lane(request, parsed.count, config)
    info["lane"] = lane.value
    scheduler = served.scheduler
    if scheduler.full():
        raise protocol.queue_full(scheduler.retry_after())
    start = time.monotonic()
    if _small(parsed):
        tokenized = _tokenize(model, parsed)
    else:
        characters = sum(map(len, parsed.texts)) if parsed.texts is not None else 0
        pool = service.edge_large if characters > LARGE_TEXT else service.edge
        work = loop.run_in_executor(pool, _tokenize, model, parsed)
        try:  # the deadline holds while tokenizing too (a 16 MB word takes ~20 s, or waits behind one), and a
            # client that hangs up stops it as well (a tokenization not yet started never runs)
            tokenized = await service.before_cut_off(
                _unless_gone(work, request, max(0.0, arrival + timeout - time.monotonic())))
        except asyncio.TimeoutError:  # (TimeoutError from 3.11) not yet started: never runs; else finishes unread
            service.metrics.on_drop(served.name)(DropReason.DEADLINE, parsed.count)
            raise protocol.deadline_passed(timeout) from None
        except _ClientGone:
            service.metrics.on_drop(served.name)(DropReason.DISCONNECTED, parsed.count)
            info["status"] = 499
            return Response(status_code=499)
    service.metrics.stage.labels(served.name, "tokenize").observe(time.monotonic() - start)
    tokens = int(tokenized.lengths.sum())
    if tokens > config.interactive_max_tokens:  # passages by the few must not hold up the queries
        lane = Lane.BULK
        info["lane"] = lane.value
    truncated = np.flatnonzero(tokenized.truncated)
    if not parsed.truncate and len(truncated):
        i = int(truncated[0])
        raise protocol.bad_request(f"input[{i}] is longer than the model's {model.manifest.max_seq_length} tokens "
                                   "and truncation is off ('truncate': false).", f"input[{i}]", "input_too_long")
    info.update(tokens=tokens, truncated=len(truncated))
    job = scheduler.submit(tokenized.ids, lane, arrival + timeout, timeout)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        waiting: set[asyncio.Future[Any]] = {job.future, watcher}
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, arrival + timeout - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the host server gave up on the request: its rows need not run
        # uvicorn never cancels a handler; hypercorn and others do on a disconnect or at shutdown, which
        # this side cannot tell apart, so it is counted as neither
        scheduler.cancel(job, DropReason.CANCELLED)
        _unread(job.future)
        raise
    finally:
        watcher.cancel()
    if job.future not in done:
        reason = DropReason.DISCONNECTED if watcher in done else DropReason.DEADLINE
        scheduler.cancel(job, reason)
        _unread(job.future)
        if reason is DropReason.DISCONNECTED:
            info["status"] = 499  # nginx's "client closed request": nobody reads this response
            return Response(status_code=499)
        raise protocol.deadline_passed(timeout)
    emb = job.future.result()  # raises the ApiError of a job that expired in the queue
    stage = service.metrics.stage
    stage.labels(served.name, "queue").observe((job.started or arrival) - job.enqueued)
    stage.labels(served.name, "inference").observe(job.inference_s)
    service.metrics.inputs.labels(served.name).inc(parsed.count)
    service.metrics.tokens.labels(served.name).inc(tokens)
    service.metrics.truncated.labels(served.name).inc(len(truncated))
    args = (emb, served.name, parsed.encoding, tokens)
    if parsed.count > 16:
        payload = await loop.run_in_executor(service.edge, protocol.embeddings_body, *args)
    else:
        payload = protocol.embeddings_body(*args)
    return Response(payload, media_type=JSON, headers={TRUNCATED_HEADER: str(len(truncated)),
                                                       LANE_HEADER: lane.value})


async def list_models(service: Service, request: Request, info: dict[str, Any]) -> Response:
    data = [_model_card(service, s) for s in service.models.values()]
    return Response(json.dumps({"object": "list", "data": data}), media_type=JSON)


async def get_model(service: Service, request: Request, info: dict[str, Any]) -> Response:
    served = service.lookup(request.path_params["model"])
    return Response(json.dumps(_model_card(service, served)), media_type=JSON)


def _model_card(service: Service, served: Served) -> dict[str, Any]:
    m = served.model.manifest
    return {"id": served.name, "object": "model", "created": int(service.started), "owned_by": "embedrt",
            "dimensions": m.dim, "max_seq_length": m.max_seq_length, "device": served.model.device,
            "aliases": sorted(served.aliases)}


async def health(service: Service, request: Request, info: dict[str, Any]) -> Response:
    return Response(json.dumps({"status": "ok"}), media_type=JSON)


async def ready(service: Service, request: Request, info: dict[str, Any]) -> Response:
    state = "draining" if service.draining else "ready" if service.ready else "loading"
    return Response(json.dumps({"status": state, "models": sorted(service.models)}), 200 if state == "ready"
                    else 503, media_type=JSON)


async def metrics(service: Service, request: Request, info: dict[str, Any]) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)


def build_app(sources: list[Any], config: ServeConfig, load_options: dict[str, Any]) -> Starlette:
    """The Starlette app over a new :class:`Service` (see :func:`embedrt.serve.create_app`)."""
    service = Service(sources, config, load_options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()
        service.cutoff = asyncio.Event()
        await asyncio.get_running_loop().run_in_executor(None, service.start)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    def route(path: str, handler: Handler, methods: list[str], open_: bool = False, *aliases: str) -> list[Route]:
        return [Route(p, _endpoint(service, path, handler, open_=open_), methods=methods) for p in (path, *aliases)]

    routes = [
        *route("/v1/embeddings", embeddings, ["POST"], False, "/embeddings"),
        *route("/v1/models", list_models, ["GET"], False, "/models"),
        *route("/v1/models/{model:path}", get_model, ["GET"], False, "/models/{model:path}"),
        *route("/health", health, ["GET"], True),
        *route("/ready", ready, ["GET"], True),
        *route("/metrics", metrics, ["GET"]),
    ]
    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        headers = dict(getattr(exc, "headers", None) or {})  # a 405's Allow (RFC 9110 requires it)
        if status == 405:
            allowed = headers.get("Allow", "")
            error = ApiError(405, f"{request.url.path} does not take {request.method}; it takes {allowed}.",
                             code="method_not_allowed")
        else:
            error = ApiError(status, f"No route {request.method} {request.url.path}.", code="not_found")
        headers["X-Request-Id"] = _request_id(request)
        return Response(error.body(), status, headers=headers, media_type=JSON)

    app = _App(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    # a path with a slash added is a 404 in OpenAI's shape, not a 307 with no body: clients do not follow a
    # redirect of a POST with its body, and the error says what was wrong
    app.router.redirect_slashes = False
    app.state.service = service
    embed = _endpoint(service, "/v1/embeddings", embeddings)
    app.fast_posts = {"/v1/embeddings": embed, "/embeddings": embed}
    return app


class _App(Starlette):
    """Starlette, with ``POST /v1/embeddings`` answered straight from ``__call__``.

    The hot route skips the router's matching and Starlette's two exception middlewares (a quarter of
    the event loop's time per request under load); its endpoint already answers every error itself, in
    OpenAI's shape. Everything else, the lifespan included, goes through Starlette as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_posts: dict[str, Callable[[Request], Awaitable[Response]]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast_posts.get(_route_path(scope))
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _route_path(scope: Any) -> str:
    """The request's path below the app's mount point (``root_path``), as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and len(path) > len(root) and path[len(root)] == "/":
        return path[len(root):]
    return path

