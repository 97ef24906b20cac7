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
    """Validate a target name, in any case (``auto`` means this CPU); the error lists the valid ones."""
    value = value.lower() if isinstance(value, str) else value  # --format takes ONNX too
    if value == "auto":
        return detect_target()
    if value not in TARGETS:
        raise ValueError(f"unknown int8 target {value!r}; valid: auto, {', '.join(TARGETS)}")
    return value


# CPU flags that give OpenVINO native bf16 matmuls: AMX tiles (Sapphire Rapids and later) or AVX512_BF16
# dot products (Cooper Lake, Zen 4); without them bf16 is emulated and slower than f32
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# what a CPU without them lacks, and what OpenVINO 2026.4 does when asked for bf16 there: AVX-512 CPUs emulate
# it, slower than f32; AVX2 ones (AMD Zen 2, measured 2026-12-01) read the hint back as f32 and compute f32
NO_BF16_UNITS = f"no bf16 units (none of {', '.join(BF16_FLAGS)} in /proc/cpuinfo)"
OPENVINO_WITHOUT_BF16 = "OpenVINO would emulate it, slower than f32, or silently compute f32"


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


def openvino_leads(flags: frozenset[str] | None = None) -> bool:
    """Whether OpenVINO is the faster CPU backend here for a folder holding both graphs: with AVX-512, yes.

    Measured with ``benchmarks.peers`` (DistilBERT-base stand-in, 2 threads, fresh processes, median of 3
    rotated rounds): on a Xeon with AVX-512 (no AMX, 2026-11-24) OpenVINO fp32 gave 1.05x ONNX Runtime's
    passages/s, and on AMX CPUs it is the only bf16 path; on an AVX2-only AMD EPYC (Zen 2, 2026-12-01) ONNX
    Runtime was ahead on both passages/s and single-query latency, fp32 and int8 alike (see the README).
    """
    have = cpu_flags() if flags is None else flags
    return "avx512f" in have


def missing_features(target: str, flags: frozenset[str] | None = None) -> list[str]:
    """Flags ``target`` needs that this CPU lacks."""
    have = cpu_flags() if flags is None else flags
    return [f for f in TARGETS.get(target, ()) if f not in have]


def summary(flags: frozenset[str] | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """One line on what this CPU gives embedrt: its name, the CPU backend ``auto`` tries first, bf16 units (and
    whether bf16 pays), int8 target."""
    have = cpu_flags(cpuinfo) if flags is None else flags
    units = bf16_units(have)
    if units is None:
        bf16 = "no bf16 units: fp32 folders run f32, bf16 folders are refused"
    elif bf16_pays(have):
        bf16 = f"bf16 units {units}: bf16 pays (AMX)"
    else:
        bf16 = f"bf16 units {units}, no AMX: f32 is faster, fp32 folders run f32"
    target = detect_target(have)
    int8 = f"int8 target {target}"
    if target in SATURATING_TARGETS:
        int8 += " (no VNNI: u8 x s8 products saturate, so ONNX Runtime int8 uses 7-bit weights)"
    lead = ("auto tries OpenVINO first (AVX-512)" if openvino_leads(have)
            else "auto tries ONNX Runtime first (no AVX-512)")
    return f"{cpu_name(cpuinfo)}; {lead}; {bf16}; {int8}"
