"""Imported first by ``embedrt``: no usage data leaves a process that runs embedrt.

ONNX Runtime's Linux and macOS wheels (1.31 on) send usage events to Microsoft's collector, keeping a device
id and an event cache under ``~/.cache/Microsoft/DeveloperTools/`` (and warning on every load where HOME is
read-only). An inference runtime for servers and edge devices sends nothing: off unless the user set the
variable first (``ORT_DISABLE_TELEMETRY=0`` keeps it on). onnxruntime reads it once, when it starts, so it is
set here, before any embedrt module can import onnxruntime. (``embedrt.export`` stubs out OpenVINO's and NNCF's
``openvino_telemetry`` likewise.)
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
