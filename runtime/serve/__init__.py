"""``embedrt serve``: an OpenAI-compatible embedding server over the library, batching across requests.

Importing this package is light: Starlette, uvicorn and prometheus_client (the ``serve`` extra) are imported
by :func:`create_app` and :func:`run`, never at import time.

Layout: :mod:`~embedrt.serve.config` (the options), :mod:`~embedrt.serve.protocol` (request parsing, errors
and responses in OpenAI's shapes), :mod:`~embedrt.serve.scheduler` (one per model: two lanes, deadlines,
the token-bounded queue, batches planned by :func:`embedrt.batching.plan_batches` and run by
``EmbeddingModel.encode_tokens``), :mod:`~embedrt.serve.metrics`, :mod:`~embedrt.serve.app` (the ASGI
app) and :mod:`~embedrt.serve.run` (uvicorn with a graceful drain).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from embedrt.serve.config import ServeConfig

if TYPE_CHECKING:
    import os

    from embedrt.model import EmbeddingModel

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(
    models: Sequence[EmbeddingModel | str | os.PathLike[str]],
    config: ServeConfig | None = None,
    **load_options: Any,
) -> Any:
    """The server as an ASGI app (Starlette), for uvicorn or to mount in another app.

    Args:
        models: loaded models, or model folders to load at start-up (with ``load_options``).
        config: limits, keys and scheduling options; defaults as ``embedrt serve``.
        load_options: passed to :func:`embedrt.load` for folders (``device``, ``threads``, ``spinning``, ...);
            a model's bulk-lane instance (``ServeConfig.bulk_instance``) is loaded as the model was.

    Returns:
        A Starlette app; ``app.state.service`` is the :class:`~embedrt.serve.app.Service`
        (``service.begin_drain()`` starts a graceful shutdown when the host server does not call it).

    Raises:
        MissingDependencyError: the ``serve`` extra is not installed.
    """
    from embedrt._optional import require

    require("starlette", "serve")
    require("prometheus_client", "serve")
    from embedrt.serve.app import build_app

    return build_app(list(models), config or ServeConfig(), load_options)


def run(
    app: Any, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, listener: Any = None,
    **uvicorn_options: Any
) -> None:
    """Serve ``app`` (from :func:`create_app`) with uvicorn until SIGTERM / SIGINT, then drain; on ``listener``
    (a socket from ``embedrt.serve.run.listen``) if given, else on ``host:port``.

    Raises:
        MissingDependencyError: uvicorn is not installed.
    """
    from embedrt._optional import require

    require("uvicorn", "serve")
    from embedrt.serve.run import serve_forever

    serve_forever(app, host, port, drain_timeout, listener, **uvicorn_options)
