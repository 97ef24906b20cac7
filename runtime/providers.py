"""Device strings, thread budget, and ONNX Runtime provider checks. No silent fallbacks live here."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from embedrt.errors import ProviderUnavailableError

DEVICE_KINDS = ("auto", "cpu", "cuda", "openvino")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class DeviceRequest:
    """A parsed device string: ``auto``, ``auto:cpu``, ``cpu``, ``cuda[:N]`` or ``openvino[:DEVICE]``.

    ``cpu_only`` (``auto:cpu``): ``auto`` among the folder's CPU backends only, never a GPU.
    """

    kind: str
    index: int = 0
    openvino_device: str = "CPU"
    cpu_only: bool = False

    def __str__(self) -> str:
        if self.kind == "auto" and self.cpu_only:
            return "auto:cpu"
        if self.kind == "cuda":
            return f"cuda:{self.index}"
        if self.kind == "openvino":
            return f"openvino:{self.openvino_device}"
        return self.kind


VIRTUAL_OPENVINO_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def parse_device(device: str) -> DeviceRequest:
    """Parse a device string.

    Args:
        device: ``"auto"``, ``"auto:cpu"`` (auto without GPUs), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"openvino"`` or ``"openvino:NAME"`` where NAME is an OpenVINO device (``CPU``, ``GPU``, ``GPU.1``,
            ``NPU``, ...).

    Returns:
        The parsed request.

    Raises:
        ValueError: the string is not one of these forms; the message lists them.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu', 'cuda:0' or 'openvino', got {device!r}")
    kind, _, arg = device.strip().partition(":")
    kind = kind.lower()
    valid = "auto, auto:cpu, cpu, cuda, cuda:N, openvino, openvino:CPU|GPU|GPU.N|NPU"
    if kind == "auto" and arg.lower() == "cpu":
        return DeviceRequest("auto", cpu_only=True)
    if kind not in DEVICE_KINDS or (arg and kind in ("auto", "cpu")):
        raise ValueError(f"unknown device {device!r}; valid: {valid}")
    if kind == "cuda":
        if arg and not arg.isdigit():
            raise ValueError(f"unknown device {device!r}: the CUDA index must be a number; valid: {valid}")
        return DeviceRequest("cuda", index=int(arg or 0))
    if kind == "openvino":
        name = (arg or "CPU").upper()
        if name.partition(":")[0] in VIRTUAL_OPENVINO_DEVICES:
            # OpenVINO's own device choice: the CPU properties (threads, f32/bf16) would not reach the device it
            # picks, and model.precision could not say what runs
            raise ValueError(f"device {device!r}: OpenVINO's {name.partition(':')[0]} device is not supported, as "
                             "embedrt pins each device's properties itself; use device='auto' (embedrt's own "
                             "choice), 'openvino' (its CPU) or 'openvino:GPU'")
        return DeviceRequest("openvino", openvino_device=name)
    return DeviceRequest(kind)


def default_thread_count() -> int:
    """Threads this process may really use: CPU affinity, capped by a cgroup CPU quota if one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        # a quota of 1.5 CPUs gets 1 thread: spinning threads beyond the quota only get throttled
        count = min(count, max(1, math.floor(quota)))
    return max(1, min(count, 1024))  # embedrt.plan.MAX_THREADS


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1 CFS files), or None."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cuda_unavailable_reason(ort: Any) -> str | None:
    """Why ONNX Runtime cannot run CUDA here, or None if the CUDA provider looks loadable."""
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        return (
            f"onnxruntime {ort.__version__} has no CUDA provider (this build offers {', '.join(available)}); "
            "put ONNX Runtime's GPU build in its place: "
            "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.20'"
        )
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if library.exists():
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:  # names the CUDA/cuDNN library that is missing or of the wrong version
            return f"the CUDA provider library failed to load: {exc}"
    return None


def check_session_providers(requested: str, got: list[str]) -> None:
    """Compare the providers a session really has with the one asked for.

    Raises:
        ProviderUnavailableError: ``requested`` is not among ``got``, i.e. ONNX Runtime fell back silently.
    """
    if requested not in got:
        raise ProviderUnavailableError(
            f"asked for {requested} but the ONNX Runtime session came up with {got}; "
            "see ONNX Runtime's log above for the library that failed to load"
        )
