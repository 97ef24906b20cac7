"""Device policy in one place: what a load runs on and how, decided once from the request, folder and CPU.

``load`` builds a :class:`DevicePlan` per device it tries (``auto`` tries several, in
:func:`auto_requests` order); the backends in :mod:`embedrt.backends` only execute a plan, and the
model's batching follows it. To change a decision (a new precision on some CPUs, another shape
bucketing on a new accelerator), change it here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.batching import BatchCost
from embedrt.cpu import NO_BF16_UNITS, OPENVINO_WITHOUT_BF16, bf16_pays, bf16_units, cpu_name, openvino_leads
from embedrt.errors import ProviderUnavailableError
from embedrt.manifest import ONNX_NAME, OPENVINO_BIN, OPENVINO_XML, Manifest, Precision
from embedrt.providers import CPU_EP, CUDA_EP, DeviceRequest, cuda_unavailable_reason

log = logging.getLogger("embedrt")

ShapeBuckets = tuple[tuple[int, int], ...]
# Shape buckets for backends that keep state per input shape: (longest length, pad to a multiple of).
# Short texts get fine steps (a 17-token query padded to 32 costs 27% more than to 24 on DistilBERT-base),
# long ones coarse steps; 28 distinct lengths up to 512 in all.
SHAPE_BUCKETS: ShapeBuckets = ((64, 8), (256, 16), (2**31, 32))
EXACT: ShapeBuckets = ()
# Row counts a call may have on such backends: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them).
# OpenVINO's CPU plugin keeps about 2 MB of compiled kernels per (rows, length) shape it has run and does not
# give it back (CPU_RUNTIME_CACHE_CAPACITY only trims part of it): on the DistilBERT-base int8 IR, 160 calls
# of random rows and lengths grew RSS by 293 MB. With these sizes and the length buckets a model sees a few
# hundred shapes at most; the planner weighs the extra calls like any other.
ROW_SIZES: tuple[int, ...] = tuple(sorted({2**k for k in range(14)} | {3 * 2**k for k in range(13)}))

# (call_overhead, token_budget) per kind of device. Measured on DistilBERT-base, 2 threads, ONNX Runtime
# and OpenVINO CPU alike: a call costs ~20-30 tokens' worth on top of its tokens, and the per-token cost is
# flat from ~512 to ~4096 padded tokens per call, then rises (bigger attention buffers). An accelerator
# wants large calls: its per-token cost is tiny next to a launch (not yet measured on a GPU).
CPU_CALLS: tuple[float, int | None] = (32.0, 4096)
ACCELERATOR_CALLS: tuple[float, int | None] = (1024.0, None)

# graphs exported by embedrt keep residual Add + LayerNormalization apart; on the CPU ONNX Runtime must not
# fuse them back, as its SkipLayerNormalization kernel is ~4x slower (see embedrt.export.quantize's
# optimize_graph). On CUDA the fused kernel is the fast one, so it may.
CPU_DISABLED_FUSIONS: tuple[str, ...] = ("SkipLayerNormFusion",)
HINTS = ("latency", "throughput")


# more intra-op threads than any CPU here has cores: thread pools that large only stall (4,096 on 2 cores
# did not finish a load in 2 minutes) or exhaust memory
MAX_THREADS = 1024


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    """What the caller of ``load`` asked for, besides the device."""

    threads: int
    verify: bool = False
    openvino_cache_dir: str | None = None
    performance_hint: str | None = None  # OpenVINO's hint; None: latency
    batch_cost: BatchCost | None = None  # None: the device's own cost model
    allow_fallback: bool = False  # a bf16 folder on a CPU without bf16 units runs in f32 instead of failing
    inference_precision: str | None = None  # OpenVINO CPU: "f32" or "bf16"; None: the folder's own choice
    spinning: bool = True  # ONNX Runtime: idle intra-op threads busy-wait for work (see DevicePlan.spinning)

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, (int, np.integer)):
            raise TypeError(f"threads must be an int, got {self.threads!r}")
        object.__setattr__(self, "threads", int(self.threads))
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}, got {self.threads}")
        for name in ("verify", "allow_fallback", "spinning"):
            check_bool(name, getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.openvino_cache_dir is not None:
            if not isinstance(self.openvino_cache_dir, (str, os.PathLike)):
                raise TypeError(f"openvino_cache_dir must be a folder path or None, got {self.openvino_cache_dir!r}")
            if not os.fspath(self.openvino_cache_dir):
                raise ValueError("openvino_cache_dir is empty: give a folder, or None for no cache")
            object.__setattr__(self, "openvino_cache_dir", os.fspath(self.openvino_cache_dir))
        if self.batch_cost is not None and not isinstance(self.batch_cost, BatchCost):
            raise TypeError(f"batch_cost must be a BatchCost or None, got {type(self.batch_cost).__name__}")
        if self.inference_precision not in (None, "f32", "bf16"):
            raise ValueError(f"unknown inference_precision {self.inference_precision!r}; valid: f32, bf16 "
                             "(or None for the folder's own choice)")
        if self.performance_hint is not None and (not isinstance(self.performance_hint, str)
                                                  or self.performance_hint.lower() not in HINTS):
            raise ValueError(f"unknown performance_hint {self.performance_hint!r}; valid: {', '.join(HINTS)}")

    def unused_by(self, kind: str) -> list[str]:
        """The settings given that a device of ``kind`` does not use, as ``name=value``: OpenVINO's
        (``openvino_cache_dir``, ``performance_hint``) elsewhere, ONNX Runtime's (``spinning=False``) on
        OpenVINO. (``inference_precision`` too is OpenVINO's, but a device that cannot honour it refuses it:
        :func:`plan_device`.)"""
        if kind == "openvino":
            return [] if self.spinning else ["spinning=False"]
        given = {"openvino_cache_dir": self.openvino_cache_dir, "performance_hint": self.performance_hint}
        return [f"{name}={value!r}" for name, value in given.items() if value is not None]


def check_bool(name: str, value: object) -> None:
    """``value`` is True or False (``"no"``, 0 or None are not: a string is always truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """How one model folder runs on one device; backends execute it, they decide nothing.

    Attributes:
        request: the concrete device (never ``auto``).
        graph_files: the folder's files this device reads (checked against the manifest before use).
        threads: intra-op threads.
        providers: ONNX Runtime providers in order (empty for OpenVINO).
        disabled_fusions: ONNX Runtime graph optimizers turned off for this device.
        openvino_config: the properties OpenVINO compiles with (hint, threads, inference precision).
        openvino_cache_dir: OpenVINO's compiled-model cache, if any.
        inference_precision: what OpenVINO computes non-int8 ops in on the CPU (``f32``); None elsewhere.
        shape_buckets: how lengths are padded (see :func:`embedrt.batching.padded_lengths`).
        batch_cost: the cost model that groups texts into calls.
        on_host: whether the weights live in this process's memory (huge pages apply).
        row_sizes: the row counts a call may have (see :func:`embedrt.batching.plan_batches`); empty for any.
        spinning: ONNX Runtime's intra-op threads busy-wait between pieces of work (its default, and the
            fastest measured here, in-process and served); False lets them sleep, for hosts whose other
            processes need the cores between calls. OpenVINO has no such switch.
    """

    request: DeviceRequest
    graph_files: tuple[str, ...]
    threads: int
    providers: tuple[Any, ...]
    disabled_fusions: tuple[str, ...]
    openvino_config: Mapping[str, Any]
    openvino_cache_dir: str | None
    inference_precision: str | None
    shape_buckets: ShapeBuckets
    batch_cost: BatchCost
    on_host: bool
    row_sizes: tuple[int, ...] = ()
    spinning: bool = True

    @property
    def device(self) -> str:
        """The device as ``load`` reports it: ``cpu``, ``cuda:N`` or ``openvino:NAME``."""
        return str(self.request)


def plan_device(root: Path, manifest: Manifest, request: DeviceRequest, settings: LoadSettings) -> DevicePlan:
    """The plan for running the folder at ``root`` on ``request`` (not ``auto``).

    Raises:
        ProviderUnavailableError: the folder has no graph for this device, or CUDA cannot run here.
    """
    on_openvino_cpu = request.kind == "openvino" and request.openvino_device.startswith("CPU")
    if settings.inference_precision == "bf16" and not on_openvino_cpu:
        raise ProviderUnavailableError(f"inference_precision='bf16' runs on OpenVINO only (its CPU device), "
                                       f"not on {request}")
    if request.kind == "openvino":
        return _openvino_plan(root, manifest, request, settings)
    if "onnx" not in manifest.graphs:
        raise ProviderUnavailableError(
            f"{root} holds no ONNX graph (it has {', '.join(manifest.graphs)}); use device='openvino' "
            "or export with --format onnx"
        )
    cuda = request.kind == "cuda"
    if cuda:
        reason = cuda_unavailable_reason(require("onnxruntime", "runtime"))
        if reason:
            raise ProviderUnavailableError(f"device {request} unavailable: {reason}")
    providers: tuple[Any, ...] = ((CUDA_EP, {"device_id": request.index}), CPU_EP) if cuda else (CPU_EP,)
    # the CPU provider has no per-shape state, so exact lengths cost least; CUDA keeps per-shape kernel
    # choices and allocations, so bucket there
    return DevicePlan(
        request=request, graph_files=(ONNX_NAME,), threads=settings.threads, providers=providers,
        disabled_fusions=() if cuda else CPU_DISABLED_FUSIONS, openvino_config=MappingProxyType({}),
        openvino_cache_dir=None, inference_precision=None, shape_buckets=SHAPE_BUCKETS if cuda else EXACT,
        batch_cost=settings.batch_cost or _cost(ACCELERATOR_CALLS if cuda else CPU_CALLS, manifest), on_host=not cuda,
        spinning=settings.spinning,
    )


def _openvino_plan(root: Path, manifest: Manifest, request: DeviceRequest, settings: LoadSettings) -> DevicePlan:
    if "openvino" not in manifest.graphs:
        raise ProviderUnavailableError(
            f"{root} holds no OpenVINO IR (it has {', '.join(manifest.graphs)}); "
            "export it with: embedrt export SOURCE --format openvino"
        )
    on_cpu = request.openvino_device.startswith("CPU")
    precision = (openvino_cpu_precision(manifest, settings.allow_fallback, requested=settings.inference_precision)
                 if on_cpu else None)
    config: dict[str, Any] = {"PERFORMANCE_HINT": (settings.performance_hint or "latency").upper()}
    if on_cpu:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    # OpenVINO keeps compiled state per input shape: without buckets its memory grew 17.7% over 10,000
    # calls of random lengths
    return DevicePlan(
        request=request, graph_files=(OPENVINO_XML, OPENVINO_BIN), threads=settings.threads, providers=(),
        disabled_fusions=(), openvino_config=MappingProxyType(config), openvino_cache_dir=settings.openvino_cache_dir,
        inference_precision=precision, shape_buckets=SHAPE_BUCKETS, row_sizes=ROW_SIZES,
        batch_cost=settings.batch_cost or _cost(CPU_CALLS if on_cpu else ACCELERATOR_CALLS, manifest), on_host=on_cpu,
        spinning=settings.spinning,
    )


def bf16_verified(manifest: Manifest, units: str | None = None) -> float | None:
    """The smallest cosine of the folder's IR run in bf16 against sentence-transformers, if its export checked
    that and it passed (``parity.openvino.bf16``), on ``units`` if given (AMX and AVX512_BF16 run different
    kernels); None otherwise."""
    record = (manifest.parity.get("openvino") or {}).get("bf16") or {}
    if record.get("passed") is True and (units is None or record.get("units") == units):
        return float(min(record["min_cosine"], record.get("min_cosine_unbatched", 1.0)))
    return None


def openvino_cpu_precision(manifest: Manifest, allow_fallback: bool = False, flags: frozenset[str] | None = None,
                           requested: str | None = None) -> str:
    """The precision OpenVINO's CPU plugin computes non-int8 ops in, for this folder: ``bf16`` or ``f32``.

    Left alone, OpenVINO runs every op that is not int8 in bf16 on CPUs that have it. So it is told:
    - ``requested`` (``load(..., inference_precision=...)``) when given: ``f32`` always works; ``bf16``
      needs bf16 units, and is refused for int8 folders (below);
    - bf16 folders (exported with ``--precision bf16``, parity checked in bf16): ``bf16``, on a CPU with
      bf16 units (AMX or AVX512_BF16); elsewhere bf16 would be emulated, slower than f32, so that is an error,
      or with ``allow_fallback`` a warning and ``f32`` (the IR holds fp32 weights: exact fp32 results);
    - fp32 folders: ``bf16`` where it is both fast and faithful: the export checked the IR in bf16 against
      sentence-transformers on AMX (``parity.openvino.bf16`` passed, min cosine >= 0.9999, units
      ``amx_bf16``; the check runs on every export made on a CPU with bf16 units, but AVX512_BF16 runs other
      kernels) and this CPU has AMX (:func:`embedrt.cpu.bf16_pays`); else ``f32``;
    - int8 folders: ``f32`` too: in OpenVINO 2026.4.1 the bf16 attention of the NNCF all-MiniLM-L6-v2 goes
      wrong at sequence length 32 (= its head size), cosine 0.73-0.85 to fp32 on some queries; with f32 it is
      0.995 and no slower (5.8 vs 6.1 ms for 8 x 32 tokens).

    Raises:
        ProviderUnavailableError: a bf16 folder, a CPU without bf16 units, and no ``allow_fallback``.
    """
    if requested == "f32":
        return "f32"
    if manifest.precision is Precision.INT8:
        if requested == "bf16":
            raise ProviderUnavailableError("int8 folders keep their non-int8 ops in f32 (OpenVINO's bf16 attention "
                                           "of the int8 model goes wrong at sequence length 32); "
                                           "inference_precision='bf16' is refused for them")
        return "f32"
    if manifest.precision is not Precision.BF16 and requested is None:
        verified = bf16_verified(manifest, units="amx_bf16")
        pays = bf16_pays(flags)
        if verified is not None and pays:
            log.info("embedrt: running the fp32 folder in bf16 on AMX: its export checked it in bf16 (min cosine "
                     "%.5f to sentence-transformers); load(..., inference_precision='f32') for exact fp32", verified)
            return "bf16"
        if pays:  # where bf16 would pay, say why it does not run
            log.info("embedrt: running the fp32 folder in f32 on this AMX CPU: its export did not check it in bf16 on "
                     "AMX (export it on an AMX CPU for a folder that runs bf16 here)")
        return "f32"
    units = bf16_units(flags)
    if units is not None:
        return "bf16"
    what = "this folder runs in bf16 (exported with --precision bf16)" if requested is None else "bf16 was asked for"
    cannot = "the bf16 the folder was checked in cannot run here" if requested is None else "bf16 cannot run here"
    message = f"{what}, but this CPU ({cpu_name()}) has {NO_BF16_UNITS}, so {cannot}: {OPENVINO_WITHOUT_BF16}"
    if not allow_fallback:
        raise ProviderUnavailableError(f"{message}; load it with allow_fallback=True (--allow-fallback) to run "
                                       "it in f32, or use an fp32 export")
    log.warning("%s; running it in f32 as allow_fallback=True", message)
    return "f32"


def running_precision(manifest: Manifest, plan: DevicePlan) -> str:
    """What the model's matmuls run in under ``plan``: ``int8``, ``bf16``, ``fp16`` or ``fp32``."""
    if manifest.precision is Precision.INT8:
        return "int8"
    if plan.inference_precision == "bf16":
        return "bf16"
    if manifest.precision is Precision.FP16 and plan.request.kind == "cuda":
        return "fp16"
    return "fp32"  # fp16 graphs on the CPU: ONNX Runtime upcasts; bf16 folders that fell back to f32


def _cost(calls: tuple[float, int | None], manifest: Manifest) -> BatchCost:
    overhead, budget = calls
    # attention adds 4 x L x hidden FLOPs per token to the 2 x (4 + 2 x 4) x hidden^2 of the linear layers
    return BatchCost(overhead, 6.0 * manifest.dim, budget)


def auto_requests(manifest: Manifest, cpu_only: bool = False) -> list[DeviceRequest]:
    """``auto``'s order: CUDA if a CUDA session can come up (never for int8; never with ``cpu_only``, i.e.
    ``auto:cpu``), then the folder's CPU-side graphs,
    the faster backend on this CPU first (:func:`embedrt.cpu.openvino_leads`: OpenVINO on CPUs with AVX-512,
    ONNX Runtime elsewhere; a folder from ``export --precision auto`` timed on this CPU: the device it was fastest
    on). Each is tried in turn; the first whose backend comes up wins."""
    candidates: list[DeviceRequest] = []
    # int8 is never auto on GPU
    if not cpu_only and manifest.precision is not Precision.INT8 and "onnx" in manifest.graphs:
        try:
            import onnxruntime

            if cuda_unavailable_reason(onnxruntime) is None:
                candidates.append(DeviceRequest("cuda"))
        except ImportError:
            pass
    cpu_side = []
    if "openvino" in manifest.graphs:
        cpu_side.append(DeviceRequest("openvino"))
    if "onnx" in manifest.graphs:
        cpu_side.append(DeviceRequest("cpu"))
    lead = _cpu_side_lead(manifest)
    cpu_side.sort(key=lambda r: r.kind != lead)
    return candidates + cpu_side


def _cpu_side_lead(manifest: Manifest) -> str:
    """``openvino`` or ``cpu``: what ``auto`` tries first for a folder holding both an IR and an ONNX graph."""
    # a folder from ``export --precision auto`` names the device it was fastest on, on the CPU it was timed on
    record = manifest.extra.get("auto") or {}
    if record.get("device") and record.get("cpu") == cpu_name():
        return str(record["device"])
    if record.get("device"):
        log.info("auto: the folder was timed on %s, not on this CPU (%s): its device choice is not taken",
                 record.get("cpu"), cpu_name())
    return "openvino" if openvino_leads() else "cpu"


def fallback_request(request: DeviceRequest, allow_fallback: bool) -> DeviceRequest | None:
    """Where a load goes when ``request`` cannot be used: the CPU if the caller allowed it, else nowhere."""
    if not allow_fallback or request.kind == "cpu":
        return None
    return DeviceRequest("cpu")


def parity_device(precision: Precision) -> str:
    """Where the exporter checks an ONNX graph: fp16 where it will run, on CUDA, if this machine has it."""
    if precision is not Precision.FP16:
        return "cpu"
    reason = cuda_unavailable_reason(require("onnxruntime", "runtime"))
    if reason is None:
        return "cuda"
    log.warning("checking the fp16 graph on the CPU (ONNX Runtime upcasts there), not on a GPU: %s", reason)
    return "cpu"
