"""CPU instruction-set detection for int8 targets (AVX2, AVX-512, VNNI, AMX, ARM dot product)."""

from __future__ import annotations

import platform
from pathlib import Path

# target name -> CPU flags its int8 kernels rely on, fastest first
TARGETS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_int8", "avx512_vnni"),
    "avx512_vnni": ("avx512f", "avx512_vnni"),
    "avx_vnni": ("avx2", "avx_vnni"),
    "avx512": ("avx512f",),
    "avx2": ("avx2",),
    "arm64_dotprod": ("asimddp",),
    "arm64": ("asimd",),
    "generic": (),
}
# without VNNI/AMX, x86 u8 x s8 kernels add pairs of products in int16 (pmaddubsw) and saturate unless
# weights use 7 bits ("reduce_range"), as ONNX Runtime's quantization docs warn
SATURATING_TARGETS = frozenset({"avx2", "avx512", "generic"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` or ARM ``Features`` lines of /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset({"asimd"} if platform.machine() in ("arm64", "aarch64") else ())
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_target(flags: frozenset[str] | None = None) -> str:
    """The best int8 target this CPU supports."""
    have = cpu_flags() if flags is None else flags
    for name, needed in TARGETS.items():
        if needed and set(needed) <= have:
            return name
    return "generic"


def parse_target(value: str) -> str:
    """Validate a target name (``auto`` means this CPU); the error lists the valid ones."""
    if value == "auto":
        return detect_target()
    if value not in TARGETS:
        raise ValueError(f"unknown int8 target {value!r}; valid: auto, {', '.join(TARGETS)}")
    return value


# CPU flags that give OpenVINO native bf16 matmuls: AMX tiles (Sapphire Rapids and later) or AVX512_BF16
# dot products (Cooper Lake, Zen 4); without them bf16 is emulated and slower than f32
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_units(flags: frozenset[str] | None = None) -> str | None:
    """The bf16 matrix units this CPU has (``amx_bf16`` or ``avx512_bf16``), or None."""
    have = cpu_flags() if flags is None else flags
    return next((f for f in BF16_FLAGS if f in have), None)


def bf16_pays(flags: frozenset[str] | None = None) -> bool:
    """Whether OpenVINO's bf16 is faster than f32 on this CPU: only with AMX tiles.

    With AVX512_BF16 dot products alone it was slower than f32 (Xeon without AMX, 2 threads, 2026-11-23:
    all-MiniLM-L6-v2 on the SciFact corpus 207 vs 131 s; DistilBERT-base 5.2 vs 8.5 passages/s); on the AMX
    Xeon of issue #14, 140 vs 44 docs/s.
    """
    have = cpu_flags() if flags is None else flags
    return "amx_bf16" in have


def missing_features(target: str, flags: frozenset[str] | None = None) -> list[str]:
    """Flags ``target`` needs that this CPU lacks."""
    have = cpu_flags() if flags is None else flags
    return [f for f in TARGETS.get(target, ()) if f not in have]
