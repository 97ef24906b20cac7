"""Loading a model folder and encoding text with it."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedrt import hugepages, ops
from embedrt.backends import Backend, open_backend
from embedrt.batching import BatchCost, padded_lengths, plan_batches
from embedrt.contract import check_graph
from embedrt.errors import ProviderUnavailableError
from embedrt.manifest import (
    DOCUMENT_PROMPTS,
    OUTPUT_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    Manifest,
    Precision,
    check_files,
    read_manifest,
    resolve_prompt,
)
from embedrt.plan import (
    DevicePlan,
    LoadSettings,
    auto_requests,
    check_bool,
    fallback_request,
    plan_device,
    running_precision,
)
from embedrt.providers import DeviceRequest, default_thread_count, parse_device
from embedrt.tokenize import TextTokenizer, Tokenized, check_count, check_texts, check_token_ids

log = logging.getLogger("embedrt")
# texts tokenized and planned together: bounds encode's memory whatever the input size (tokenizing 8,000
# texts of 512 tokens up front took 760 MB), while a thousand length-sorted texts keep the planner's padding
# savings (a call holds at most a few dozen texts)
WINDOW = 1024


class EmbeddingModel:
    """A loaded model folder: tokenizer plus one inference backend.

    Attributes:
        path: the model folder.
        manifest: its validated manifest.
        device: the device actually used, e.g. ``"cpu"``, ``"cuda:0"``, ``"openvino:CPU"``.
        providers: the providers the backend really runs on.
        plan: how it runs there (providers, OpenVINO properties, shape buckets, batch cost); see
            :mod:`embedrt.plan`.
        dim: embedding dimension.
        similarity_metric: the checkpoint's similarity function, the default for scoring.
    """

    def __init__(
        self, path: Path, manifest: Manifest, plan: DevicePlan, backend: Backend, tokenizer: TextTokenizer,
        huge_pages: hugepages.Collapse | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.plan = plan
        self._backend = backend
        self._tokenizer = tokenizer
        self.device = plan.device
        self.providers = list(backend.providers)
        self.dim = manifest.dim
        self.similarity_metric = manifest.similarity
        self.precision = running_precision(manifest, plan)  # what the matmuls really run in
        self.huge_pages = huge_pages  # the background move of this model's memory into 2 MB pages, if any

    def __repr__(self) -> str:
        return f"EmbeddingModel({str(self.path)!r}, device={self.device!r}, dim={self.dim})"

    @property
    def prompts(self) -> dict[str, str]:
        """The checkpoint's named prompts (``prompt_name`` -> text put before each input); may be empty."""
        return dict(self.manifest.prompts)

    def _texts(self, texts: Sequence[str], prompt_name: str | None, prompt: str | None) -> list[str]:
        items = check_texts(texts)
        head = resolve_prompt(self.manifest, prompt_name, prompt)
        return [head + text for text in items] if head else items

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None,
                 prompt: str | None = None) -> list[list[int]]:
        """Token ids of each text as the model sees them (prompt, truncation and special tokens included)."""
        return self._tokenizer.encode(self._texts(texts, prompt_name, prompt))

    def tokenize_batch(self, texts: Sequence[str], *, prompt_name: str | None = None,
                       prompt: str | None = None) -> Tokenized:
        """Token ids (int32 arrays) of each text and whether truncation cut it; for ``encode_tokens``.

        Raises:
            TypeError, ValueError: as ``encode``.
        """
        return self._tokenizer.encode_compact(self._texts(texts, prompt_name, prompt))

    def tokenize_ids(self, ids: Sequence[Sequence[int]]) -> Tokenized:
        """Text tokens given as ids (no special tokens), made into the model's input as ``tokenize_batch`` does.

        Each row is truncated to ``max_seq_length`` less the special tokens, and the tokenizer's special
        tokens are added around it ([CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa), so
        ``tokenize_ids(ids of a text without special tokens)`` equals ``tokenize_batch([text])``.

        Raises:
            TypeError: ``ids`` is not a list of int sequences (names the row).
            ValueError: a row holds an id outside the vocabulary (names the row). An empty row is the empty
                text's ids: it embeds as ``""`` does.
        """
        rows = check_token_ids(ids, self._tokenizer.vocab_size, max_length=2**62, allow_empty=True)
        return self._tokenizer.wrap_ids(rows)

    def encode_tokens(
        self, ids: Sequence[Sequence[int] | npt.NDArray[np.integer]], batch_size: int = 32,
        max_tokens: int | None = None,
    ) -> ops.FloatArray:
        """Embed pre-tokenized inputs (as ``tokenize`` / ``tokenize_batch`` return them), with encode's planning.

        ``encode_tokens(tokenize_batch(texts).ids)`` equals ``encode(texts)``. The ids are used as they
        are: special tokens are not added.

        Args:
            ids: per input, its token ids (a list of int or an int array), at most ``max_seq_length``.
            batch_size: most inputs per inference call.
            max_tokens: most padded tokens per call (see ``encode``).

        Returns:
            float32 ``(len(ids), dim)``, in input order.

        Raises:
            TypeError: ``ids`` is not a list of int sequences (names the row).
            ValueError: a row is empty, too long, or holds an id outside the vocabulary (names the row).
        """
        rows = check_token_ids(ids, self._tokenizer.vocab_size, self.manifest.max_seq_length)
        size = check_count(batch_size, "batch_size")
        cost = self.batch_cost(max_tokens)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for start in range(0, len(rows), WINDOW):
            window = rows[start : start + WINDOW]
            self._run_planned(window, size, cost, out[start : start + len(window)])
        return out

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        show_progress: bool = False,
        max_tokens: int | None = None,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
    ) -> ops.FloatArray:
        """Embed texts exactly as the source sentence-transformers model would.

        Texts are taken in windows of :data:`WINDOW`; each window is tokenized, sorted by length and grouped
        into calls that waste little on padding (see :mod:`embedrt.batching`), so memory is bounded by the
        window, not by ``len(texts)``. The result is in input order and does not depend on the grouping.
        Safe to call from several threads at once on one model.

        Args:
            texts: a sequence of str (an empty sequence gives shape ``(0, dim)``); not a dict or a set.
            batch_size: most texts per inference call.
            show_progress: show a progress bar over texts.
            max_tokens: most padded tokens (texts x padded length) per call; default the backend's
                budget (4096 on CPU and OpenVINO CPU, no cap on CUDA). A single text always fits.
            prompt_name: one of :attr:`prompts`, put before each text (sentence-transformers'
                ``prompt_name``); default the checkpoint's ``default_prompt_name``, if it has one.
            prompt: a text put before each text instead (``""``: none, not even the default).

        Returns:
            float32 ``(len(texts), dim)``, in input order.

        Raises:
            TypeError: ``texts`` is a single str, a dict or a set, an item is not a str (the message names
                its index), ``batch_size`` / ``max_tokens`` is not an int, or a prompt argument not a str.
            ValueError: ``batch_size`` or ``max_tokens`` is below 1, ``prompt_name`` is not one of the
                model's prompts, or both ``prompt_name`` and ``prompt`` are given.
        """
        check_bool("show_progress", show_progress)
        items = self._texts(texts, prompt_name, prompt)
        size = check_count(batch_size, "batch_size")
        cost = self.batch_cost(max_tokens)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if len(items) == 1:  # the latency path: one call, nothing to plan
            ids = self._tokenizer.encode(items)
            out[:] = self._run(ids, int(self.padded_lengths(np.array([len(ids[0])]))[0]))
            return out
        bar = _progress(len(items), show_progress)
        for start in range(0, len(items), WINDOW):
            window = items[start : start + WINDOW]
            self._run_planned(self._tokenizer.encode_compact(window).ids, size, cost, out[start : start + len(window)])
            if bar is not None:
                bar.update(len(window))
        if bar is not None:
            bar.close()
        return out

    def encode_query(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False,
                     max_tokens: int | None = None, *, prompt_name: str | None = None,
                     prompt: str | None = None) -> ops.FloatArray:
        """``encode`` for search queries: with the model's ``query`` prompt when it has one and no other is
        asked for, as sentence-transformers' ``encode_query``."""
        if prompt_name is None and prompt is None and "query" in self.manifest.prompts:
            prompt_name = "query"
        return self.encode(texts, batch_size, show_progress, max_tokens, prompt_name=prompt_name, prompt=prompt)

    def encode_document(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False,
                        max_tokens: int | None = None, *, prompt_name: str | None = None,
                        prompt: str | None = None) -> ops.FloatArray:
        """``encode`` for the documents searched: with the model's ``document``, ``passage`` or ``corpus``
        prompt (the first it has) when no other is asked for, as sentence-transformers' ``encode_document``."""
        if prompt_name is None and prompt is None:
            prompt_name = next((name for name in DOCUMENT_PROMPTS if name in self.manifest.prompts), None)
        return self.encode(texts, batch_size, show_progress, max_tokens, prompt_name=prompt_name, prompt=prompt)

    def _run_planned(self, ids: list[np.ndarray], batch_size: int, cost: BatchCost, out: ops.FloatArray) -> None:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        padded = self.padded_lengths(lengths)
        for index in plan_batches(lengths, batch_size, cost, padded, self.plan.row_sizes):
            out[index] = self._run([ids[i] for i in index], int(padded[index].max()))

    def _run(self, ids: Sequence[Sequence[int] | np.ndarray], pad_to: int) -> ops.FloatArray:
        return np.asarray(self._backend.run(self._tokenizer.feeds(ids, pad_to)), dtype=np.float32)

    def encode_padded(self, ids: Sequence[Sequence[int]], pad_to: int) -> ops.FloatArray:
        """Embed pre-tokenized inputs in one inference call, all padded to ``pad_to`` tokens (no planning).

        For callers that batch by themselves, and for checking that padding does not change a result.

        Raises:
            TypeError, ValueError: as ``encode_tokens``; or ``pad_to`` is shorter than the longest row, or
                longer than the graph's position table (its recorded ``limits.max_positions``, else
                ``max_seq_length``): past it, the model has no positions.
        """
        rows = check_token_ids(ids, self._tokenizer.vocab_size, self.manifest.max_seq_length)
        longest = max((len(r) for r in rows), default=0)
        if check_count(pad_to, "pad_to") < longest:
            raise ValueError(f"pad_to must be >= the longest row ({longest} ids), got {pad_to}")
        positions = (self.manifest.extra.get("limits") or {}).get("max_positions")
        limit = positions if isinstance(positions, int) else self.manifest.max_seq_length
        if pad_to > limit:
            raise ValueError(f"pad_to must be <= the {limit} positions the model has, got {pad_to}")
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._run(rows, pad_to)

    def batch_cost(self, max_tokens: int | None = None) -> BatchCost:
        """The cost model that groups texts into calls (the plan's), with ``max_tokens`` as its budget if given."""
        cost = self.plan.batch_cost
        if max_tokens is None:
            return cost
        return dataclasses.replace(cost, token_budget=check_count(max_tokens, "max_tokens"))

    def set_batch_cost(self, cost: BatchCost) -> None:
        """Group texts into calls by ``cost`` from now on (``BatchCost()``: runs of ``batch_size``, no budget).

        Args:
            cost: the cost model; see :class:`embedrt.batching.BatchCost`.
        """
        if not isinstance(cost, BatchCost):
            raise TypeError(f"cost must be a BatchCost, got {type(cost).__name__}")
        self.plan = dataclasses.replace(self.plan, batch_cost=cost)

    @property
    def row_sizes(self) -> tuple[int, ...]:
        """The row counts an inference call may have on this device (empty: any); see ``plan_batches``."""
        return self.plan.row_sizes

    def padded_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Each length rounded up to the plan's shape bucket, never past max_seq_length."""
        return padded_lengths(lengths, self.plan.shape_buckets, self.manifest.max_seq_length)

    def similarity(
        self, a: npt.ArrayLike, b: npt.ArrayLike, metric: ops.Similarity | str | None = None
    ) -> ops.FloatArray:
        """Pairwise similarity ``[n, m]``; the model's own similarity function unless ``metric`` is given."""
        return ops.similarity(a, b, self.similarity_metric if metric is None else metric)

    def search(
        self,
        queries: Sequence[str],
        corpus_embeddings: npt.ArrayLike,
        k: int = 10,
        batch_size: int = 32,
        max_tokens: int | None = None,
    ) -> tuple[ops.IntArray, ops.FloatArray]:
        """Top-``k`` corpus rows for each query text, with the model's similarity function.

        The queries are embedded as :meth:`encode_query` does (the model's ``query`` prompt, if it has one);
        embed the corpus with :meth:`encode_document` to match.
        """
        queries_embedded = self.encode_query(queries, batch_size=batch_size, max_tokens=max_tokens)
        return ops.top_k(queries_embedded, corpus_embeddings, k, self.similarity_metric)


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="encode", unit="text")


def load(
    path: str | os.PathLike[str],
    device: str = "auto",
    *,
    threads: int | None = None,
    allow_fallback: bool = False,
    verify: bool = False,
    openvino_cache_dir: str | None = None,
    performance_hint: str | None = None,
    huge_pages: bool = True,
    batch_cost: BatchCost | None = None,
    inference_precision: str | None = None,
    spinning: bool = True,
) -> EmbeddingModel:
    """Load a model folder written by ``embedrt export``.

    Args:
        path: the model folder.
        device: ``"auto"`` (the default), ``"cpu"`` (ONNX Runtime), ``"cuda"``, ``"cuda:N"``, ``"openvino"`` or
            ``"openvino:NAME"``. ``auto`` tries, in order (:func:`embedrt.plan.auto_requests`): CUDA where an
            ONNX Runtime CUDA session can start (never for int8 folders), then the folder's CPU graphs, the
            faster backend for this CPU first (OpenVINO on CPUs with AVX-512, where an fp32 folder checked in
            bf16 at export runs bf16 on AMX; ONNX Runtime elsewhere); ``"auto:cpu"`` the same without CUDA.
            ``model.device`` and ``model.precision`` say what it took; ``device="cpu"`` pins ONNX Runtime on
            the CPU.
        threads: intra-op threads; default: what this process's CPU affinity and cgroup quota allow.
        allow_fallback: if the device asked for cannot be used, log a warning and run on the CPU
            instead of raising.
        verify: also check the sha256 of every file the manifest lists, the graphs of other devices too
            (the sizes of the files this load reads are always checked).
        openvino_cache_dir: where OpenVINO caches compiled models (faster second load).
        performance_hint: OpenVINO's ``latency`` (None: the default) or ``throughput`` hint.
            ``openvino_cache_dir`` and ``performance_hint`` are OpenVINO's, ``spinning=False`` is ONNX Runtime's:
            given for an explicit device of the other backend, they are refused (``ValueError``); with
            ``device="auto"``, a warning says which were not used by the backend it took.
        huge_pages: on the CPU under Linux, move the memory this load allocates (the weights, as the
            backend laid them out) into 2 MB transparent huge pages, in a background thread
            (see :mod:`embedrt.hugepages`); 0.5-5% off single-text latency here. Memory allocated
            before the load is never touched.
        batch_cost: how ``encode`` groups texts into calls; default the device's own cost model
            (``model.plan.batch_cost``). ``BatchCost()`` gives fixed runs of ``batch_size`` texts.
        inference_precision: on OpenVINO CPU, ``"f32"`` or ``"bf16"`` instead of the folder's own choice
            (see :func:`embedrt.plan.openvino_cpu_precision`: an fp32 folder runs bf16 on AMX CPUs when its
            export checked it in bf16). ``model.precision`` says what runs.
        spinning: ONNX Runtime's idle intra-op threads busy-wait for the next piece of work (its default,
            the fastest here, served or not). False lets them sleep, for hosts whose other processes need the
            cores between calls (``embedrt serve --no-spin``). No effect on OpenVINO.

    Returns:
        The loaded model; ``model.device``, ``model.providers`` and ``model.plan`` say what it runs on and how.

    Raises:
        ModelFolderError: the folder, manifest, or a file in it is missing or corrupt (names the path).
        ProviderUnavailableError: the device asked for cannot be used, and ``allow_fallback`` is False.
        ValueError: an unknown device string or performance hint, ``threads`` below 1, or a setting of the
            other backend for an explicit device.
        TypeError: an argument of the wrong type (``"no"`` for a boolean, a float for ``threads``).
    """
    check_bool("huge_pages", huge_pages)
    root = Path(path)
    manifest = read_manifest(root)
    request = parse_device(device)
    settings = LoadSettings(threads if threads is not None else default_thread_count(), verify,
                            openvino_cache_dir, performance_hint, batch_cost, allow_fallback, inference_precision,
                            spinning)
    # verify: every file the manifest lists, also the graphs this device will not read (a folder copied to
    # many hosts is checked whole wherever it is verified); else the sizes of the files this load reads
    # tokenizer_config.json is read where it is (split_special_tokens, checked against the manifest's): its size too
    read = [TOKENIZER_NAME] + [TOKENIZER_CONFIG_NAME] * (TOKENIZER_CONFIG_NAME in manifest.files
                                                          and (root / TOKENIZER_CONFIG_NAME).is_file())
    check_files(root, manifest, list(manifest.files) if verify else read, full_hash=verify)
    tokenizer = TextTokenizer(root / TOKENIZER_NAME, manifest.max_seq_length, manifest.pad_token_id, manifest.inputs,
                              split_special_tokens=manifest.split_special_tokens)
    before = hugepages.snapshot() if huge_pages else None
    plan, backend = _start(root, manifest, request, settings)
    check_graph(root, manifest, backend.graph, tokenizer.vocab_size, OUTPUT_NAME)
    _warn_if_cpu_lacks_int8_target(root, manifest, plan)
    log.info("embedrt: loaded %s on %s (providers %s)", root, plan.device, backend.providers)
    pages = hugepages.collapse_new(before) if plan.on_host else None
    return EmbeddingModel(root, manifest, plan, backend, tokenizer, pages)


def _start(root: Path, manifest: Manifest, request: DeviceRequest, settings: LoadSettings,
           ) -> tuple[DevicePlan, Backend]:
    """The plan and its running backend: ``auto`` tries its candidates in order, else the request, else fallback."""
    if request.kind == "auto":
        reasons = []
        for candidate in auto_requests(manifest, request.cpu_only):
            try:
                plan, backend = _open(root, manifest, candidate, settings)
                unused = settings.unused_by(candidate.kind)
                if unused:
                    log.warning("%s: %s not used: device='auto' took %s", root, ", ".join(unused), plan.device)
                return plan, backend
            except (ProviderUnavailableError, ImportError) as exc:  # ImportError: openvino not installed
                reasons.append(str(exc))
                log.info("auto: skipping %s: %s", candidate, exc)
        raise ProviderUnavailableError(f"no usable device for {root}: {'; '.join(reasons) or 'no graphs'}")
    unused = settings.unused_by(request.kind)
    if unused:
        runs, other = ("OpenVINO", "ONNX Runtime") if request.kind == "openvino" else ("ONNX Runtime", "OpenVINO")
        raise ValueError(f"{', '.join(unused)}: {other} only, but device={str(request)!r} runs {runs}; "
                         "leave it out, or use device='auto'")
    try:
        return _open(root, manifest, request, settings)
    except ProviderUnavailableError as exc:
        fallback = fallback_request(request, settings.allow_fallback)
        if fallback is None:
            raise
        log.warning("%s; falling back to the CPU as allow_fallback=True", exc)
        return _open(root, manifest, fallback, settings)


def _open(root: Path, manifest: Manifest, request: DeviceRequest, settings: LoadSettings,
          ) -> tuple[DevicePlan, Backend]:
    plan = plan_device(root, manifest, request, settings)
    check_files(root, manifest, list(plan.graph_files), full_hash=False)  # verify hashed them all up front
    return plan, open_backend(root, plan)


# False while the exporter loads its own scratch folders to check them: it gives the speed advice once itself
_SPEED_ADVICE: contextvars.ContextVar[bool] = contextvars.ContextVar("embedrt_speed_advice", default=True)


@contextlib.contextmanager
def without_speed_advice() -> Iterator[None]:
    """Loads inside this block skip the "OpenVINO int8 runs slower than fp32 on this CPU" warning."""
    token = _SPEED_ADVICE.set(False)
    try:
        yield
    finally:
        _SPEED_ADVICE.reset(token)


def openvino_int8_advice(root: Path | str) -> str | None:
    """The warning for an OpenVINO int8 folder at ``root`` on this CPU, or None where its int8 pays (VNNI, AMX)
    and inside ``without_speed_advice``."""
    from embedrt.cpu import SATURATING_TARGETS, detect_target

    target = detect_target()
    if target not in SATURATING_TARGETS or not _SPEED_ADVICE.get():
        return None
    # measured (AMD EPYC Zen 2, AVX2 only, 2026-12-01): OpenVINO's NNCF int8 at 0.64-0.81x its fp32 IR's
    # speed, while ONNX Runtime's int8 of the same model ran 1.1-1.2x its fp32 (README, Devices)
    return (f"{root}: OpenVINO int8 on a CPU without VNNI or AMX (int8 target {target}) runs slower than the fp32 "
            "model here; ONNX Runtime's int8 (--format onnx) or fp32 is faster on such CPUs, and "
            "`embedrt export --precision auto` measures which")


def _warn_if_cpu_lacks_int8_target(root: Path, manifest: Manifest, plan: DevicePlan) -> None:
    target = manifest.extra.get("quantization", {}).get("target") if manifest.precision is Precision.INT8 else None
    if not target or plan.request.kind == "cuda":
        return
    from embedrt.cpu import SATURATING_TARGETS, missing_features

    missing = missing_features(str(target))
    if missing:
        saturate = str(target) not in SATURATING_TARGETS
        log.warning(
            "%s was quantised for %s, but this CPU lacks %s: it will run slower%s; re-export with --target auto",
            root, target, ", ".join(missing),
            " and may lose accuracy (u8 x s8 products saturate without VNNI)" if saturate else "",
        )
    elif plan.request.kind == "openvino" and plan.on_host:
        advice = openvino_int8_advice(root)
        if advice:
            log.warning("%s", advice)
