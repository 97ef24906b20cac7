"""Inference backends: ONNX Runtime (CPU, CUDA with IOBinding) and OpenVINO. Each maps feeds to embeddings.

A backend executes a :class:`embedrt.plan.DevicePlan`: which providers, fusions, threads and OpenVINO
properties were decided there, not here.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedrt._optional import require
from embedrt.contract import STAMP_KEY, GraphInfo, parse_stamp
from embedrt.errors import ModelFolderError, ProviderUnavailableError
from embedrt.manifest import OUTPUT_NAME
from embedrt.ops import FloatArray
from embedrt.plan import DevicePlan
from embedrt.providers import CUDA_EP, check_session_providers

log = logging.getLogger("embedrt")


class Backend(Protocol):
    """What the model needs from a backend."""

    providers: list[str]  # what the session really runs on, which may differ from the plan's
    graph: GraphInfo  # what the graph file declares, checked against the manifest at load

    def run(self, feeds: dict[str, np.ndarray]) -> FloatArray:
        """Embeddings ``[batch, dim]`` float32 for one padded batch."""
        ...


def open_backend(root: Path, plan: DevicePlan) -> Backend:
    """The backend that executes ``plan`` on the graph in ``root``."""
    if plan.request.kind == "openvino":
        return OpenVinoBackend(root / plan.graph_files[0], plan)
    return OrtBackend(root / plan.graph_files[0], plan)


def _static_dim(shape: Any) -> int | None:
    last = shape[-1] if shape else None
    return last if isinstance(last, int) and last > 0 else None


def _ort_graph_info(session: Any, path: Path) -> GraphInfo:
    outputs = session.get_outputs()
    dims = {o.name: _static_dim(o.shape) for o in outputs}
    stamp = parse_stamp(session.get_modelmeta().custom_metadata_map.get(STAMP_KEY), path)
    return GraphInfo(file=path, inputs=tuple(i.name for i in session.get_inputs()), outputs=tuple(dims),
                     output_dim=dims.get(OUTPUT_NAME), stamp=stamp)


def _session_options(ort: Any, plan: DevicePlan) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = plan.threads
    if not plan.spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # every batch has another sequence length, so a memory pattern planned for one shape is rarely reused.
    # The arena stays on: without it each run pays malloc + page faults for every buffer (60% slower on
    # 32 x 256 batches here), and its size is bounded by the largest batch shape, so memory plateaus.
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = True
    opts.log_severity_level = 3
    return opts


class OrtBackend:
    """ONNX Runtime session on the CPU or one CUDA device."""

    def __init__(self, model_path: Path, plan: DevicePlan) -> None:
        ort = require("onnxruntime", "runtime")
        cuda = plan.request.kind == "cuda"
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=_session_options(ort, plan), providers=list(plan.providers),
                disabled_optimizers=list(plan.disabled_fusions),
            )
        except Exception as exc:  # ORT raises its own exception types for a bad graph or a provider failure
            if cuda and "CUDA" in str(exc):
                raise ProviderUnavailableError(f"device {plan.device} unavailable: {exc}") from exc
            raise ModelFolderError(f"{model_path}: ONNX Runtime cannot load this graph: {exc}") from exc
        self.providers = list(self._session.get_providers())
        if cuda:
            check_session_providers(CUDA_EP, self.providers)
        self._cuda_index = plan.request.index if cuda else None
        self._ort = ort
        self.graph = _ort_graph_info(self._session, model_path)

    def run(self, feeds: dict[str, np.ndarray]) -> FloatArray:
        """Embeddings ``[batch, dim]`` float32 for one padded batch."""
        if self._cuda_index is None:
            return np.asarray(self._session.run([OUTPUT_NAME], feeds)[0], dtype=np.float32)
        # inputs and the pooled output live on the GPU; only [batch, dim] is copied back
        binding = self._session.io_binding()
        for name, array in feeds.items():
            value = self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._cuda_index)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(OUTPUT_NAME, "cuda", self._cuda_index)
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


class OpenVinoBackend:
    """OpenVINO compiled model on an OpenVINO device (CPU, GPU, NPU, ...)."""

    def __init__(self, xml_path: Path, plan: DevicePlan) -> None:
        ov = require("openvino", "openvino")
        core = ov.Core()
        device = plan.request.openvino_device
        available = list(core.available_devices)
        # a device listed, or a family one is listed under ("GPU" for "GPU.0"); "CPU.0" is no device
        if device not in available and ("." in device or device not in {d.split(".")[0] for d in available}):
            raise ProviderUnavailableError(
                f"OpenVINO device {device!r} is not available here; available: {', '.join(available) or 'none'}"
            )
        if plan.openvino_cache_dir:
            core.set_property({"CACHE_DIR": str(plan.openvino_cache_dir)})
        try:
            model = core.read_model(str(xml_path))
            self.graph = _openvino_graph_info(model, xml_path)
            self._compiled = core.compile_model(model, device, dict(plan.openvino_config))
        except RuntimeError as exc:
            raise ModelFolderError(f"{xml_path}: OpenVINO cannot compile this model for {device}: {exc}") from exc
        self._requests = RequestPool(self._compiled)
        self._output = self._compiled.output(OUTPUT_NAME)
        self.providers = [f"OpenVINO:{device}"]

    def run(self, feeds: dict[str, np.ndarray]) -> FloatArray:
        """Embeddings ``[batch, dim]`` float32 for one padded batch; safe to call from several threads."""
        with self._requests.request() as infer:
            result = infer.infer(feeds)
            # the request reuses its output buffer on its next call, which may come from another thread
            return np.array(result[self._output], dtype=np.float32, copy=True)


def _openvino_graph_info(model: Any, path: Path) -> GraphInfo:
    outputs = {next(iter(o.get_names()), ""): o for o in model.outputs}
    out = outputs.get(OUTPUT_NAME)
    last = out.get_partial_shape()[-1] if out is not None and out.get_partial_shape().rank.is_static else None
    stamp = model.get_rt_info([STAMP_KEY]).astype(str) if model.has_rt_info([STAMP_KEY]) else None
    return GraphInfo(file=path, inputs=tuple(next(iter(i.get_names())) for i in model.inputs),
                     outputs=tuple(outputs), output_dim=last.get_length() if last is not None and last.is_static
                     else None, stamp=parse_stamp(stamp, path))


class RequestPool:
    """Infer requests lent one caller at a time: an OpenVINO InferRequest must not be shared between threads.

    Requests are made on demand, up to the device's optimal count (at least 2, so one caller's inputs are
    copied in while another's run); a caller beyond that waits for a free one. OpenVINO itself runs the
    requests of one compiled model in parallel up to its number of streams (1 under the latency hint).
    """

    def __init__(self, compiled: Any, size: int | None = None) -> None:
        if size is None:
            try:
                size = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            except RuntimeError:  # a plugin without the property
                size = 1
        self.size = max(2, size)
        self._compiled = compiled
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()  # the most recently used first: warm buffers

    @contextlib.contextmanager
    def request(self) -> Iterator[Any]:
        """An infer request for this caller alone, returned to the pool when the block ends."""
        with self._slots:
            try:
                infer = self._idle.get_nowait()
            except queue.Empty:
                infer = self._compiled.create_infer_request()
            try:
                yield infer
            finally:
                self._idle.put(infer)
