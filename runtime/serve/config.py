"""The server's options, one frozen dataclass (the CLI flags map onto it one to one)."""

from __future__ import annotations

import dataclasses
import math

# the least a model's queue holds in tokens by default (ServeConfig.max_queue_tokens)
DEFAULT_QUEUE_TOKENS = 262_144


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits, keys and scheduling of ``embedrt serve``.

    Attributes:
        api_keys: accepted Bearer keys; empty for an open server.
        max_batch_tokens: most padded tokens per inference call; None for the device's budget (4096 on CPU).
        max_batch_inputs: most inputs per inference call (the planner cuts below it by cost).
        max_queue_tokens: most tokens waiting per model; a request that does not fit gets 429 at once (413 if
            it alone is larger). None: ``max_inputs`` texts of the model's ``max_seq_length``, at least
            ``DEFAULT_QUEUE_TOKENS``, so that every request within ``max_inputs`` can be queued.
        max_inputs: most inputs in one request (413 past it); OpenAI's own limit is 2048.
        max_body_bytes: largest request body (413 past it).
        request_timeout: seconds from arrival to response; inputs still queued past it are dropped (504).
        interactive_max_inputs: requests with at most this many inputs go to the interactive lane
            (a request can choose with the ``X-Embedrt-Lane`` header)...
        interactive_max_tokens: ...if they hold at most this many tokens in all (special tokens counted, no
            padding): a few long passages per request (8 of 256 tokens: 2,048), sent by many clients at once,
            would otherwise fill the interactive lane and hold the queries up. The default is what a bulk
            call may cost while interactive traffic runs (``mixed_bulk_tokens``): 8 queries of 64 tokens.
            A single passage of a model of at most 512 tokens stays interactive.
        mixed_bulk_tokens: while interactive traffic is active, most padded tokens per bulk call, so an
            interactive call never waits long for a running bulk one.
        interactive_window: seconds an interactive arrival counts as "active" traffic.
        bulk_yield_limit: consecutive interactive calls after which waiting bulk inputs get the next call
            (anti-starvation).
        drain_timeout: seconds a SIGTERM / SIGINT drain may take before the process exits anyway.
        bulk_instance: ``separate`` loads a second instance of each model for the bulk lane, so an
            interactive call runs beside a bulk one instead of after it; ``shared`` uses one instance;
            ``auto`` is ``separate`` on OpenVINO (whose latency hint runs one call at a time) and ``shared``
            on ONNX Runtime (whose session runs concurrent calls itself).
    """

    api_keys: tuple[str, ...] = ()
    max_batch_tokens: int | None = None
    max_batch_inputs: int = 256
    max_queue_tokens: int | None = None
    max_inputs: int = 2048
    max_body_bytes: int = 16 * 2**20
    request_timeout: float = 60.0
    interactive_max_inputs: int = 8
    interactive_max_tokens: int = 512
    mixed_bulk_tokens: int = 512
    interactive_window: float = 1.0
    bulk_yield_limit: int = 4
    drain_timeout: float = 30.0
    bulk_instance: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_batch_inputs", "max_queue_tokens", "max_inputs", "max_body_bytes",
                     "interactive_max_inputs", "interactive_max_tokens", "mixed_bulk_tokens", "bulk_yield_limit"):
            value = getattr(self, name)
            if value is None and name == "max_queue_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_batch_tokens is not None and (not isinstance(self.max_batch_tokens, int)
                                                  or self.max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be an int >= 1 or None, got {self.max_batch_tokens!r}")
        for name in ("request_timeout", "interactive_window", "drain_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.bulk_instance not in ("auto", "separate", "shared"):
            raise ValueError(f"bulk_instance must be auto, separate or shared, got {self.bulk_instance!r}")
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings")

    def queue_tokens(self, max_seq_length: int) -> int:
        """The token bound of the queue of a model with this ``max_seq_length``."""
        if self.max_queue_tokens is not None:
            return self.max_queue_tokens
        return max(DEFAULT_QUEUE_TOKENS, self.max_inputs * max_seq_length)
