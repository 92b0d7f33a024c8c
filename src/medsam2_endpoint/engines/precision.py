"""Which arithmetic LiteMedSAM's image encoder runs in on the CPU, and on which runtime.

bf16 halves the encoder's time where the processor multiplies bf16 natively (AVX512_BF16, or AMX on
Sapphire Rapids and later; BENCHMARKS.md "bf16 on the CPU") and is emulated, slower than fp32, where it
does not. So bf16 runs only where the CPU has it and the runtime uses it (OpenVINO; torch on request), and
an explicit `bf16` on a CPU without it is refused at start rather than served slowly. `auto` takes bf16 on
OpenVINO where both are there (`AUTO_BF16`).

The CPU probe reads /proc/cpuinfo's flags; tests inject the flags instead (`cpu_has_bf16(flags=...)`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medsam2_endpoint.base.errors import ModelUnavailable

PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # the kernel's names for native bf16 multiplication
CPUINFO = Path("/proc/cpuinfo")
# runtimes that run the encoder in bf16 on the CPU: OpenVINO (INFERENCE_PRECISION_HINT) and torch (autocast).
# ONNX Runtime's CPU provider has no bf16 kernels for these graphs.
BF16_RUNTIMES = ("openvino", "torch")
# Whether `auto` takes bf16 where it can. On since the two fixes that made bf16 give fp32's answers: at first bf16
# (OpenVINO) matched fp32 on 14 of the 15 real structures but lost the MR spleen (Dice 0.836 -> 0.197; its key
# slice is the organ's tip, predicted IoU 0.552 in fp32, 0.498 in bf16). Now a key mask under the 0.5 floor is no
# reference (pipeline/tracking min_key_iou) and an answer the model doubts is computed again in fp32
# (engines/lite BF16_RECHECK_IOU): every real structure within 0.02 of fp32, mean -0.001 (BENCHMARKS.md "bf16 on
# the CPU").
AUTO_BF16 = True


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively; `flags` replaces the probe (tests)."""
    return bool(BF16_FLAGS & frozenset(cpu_flags() if flags is None else flags))


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_runtime_precision(runtime: str, precision: str, device: str, *, has_bf16: bool | None = None,
                             openvino: bool | None = None, auto_bf16: bool = AUTO_BF16) -> tuple[str, str]:
    """(runtime, precision) of LiteMedSAM's encoder from the MEDSAM2_RUNTIME and MEDSAM2_PRECISION settings.

    CUDA runs torch under bf16 autocast, as the MedSAM2 reference does on GPUs. On the CPU, with `auto_bf16`
    (the default), `auto` runtime is OpenVINO in bf16 where the CPU has bf16 and OpenVINO is installed; otherwise
    (and always without `auto_bf16`) OpenVINO in fp32, ONNX Runtime without OpenVINO, torch without both.
    `auto` precision is bf16 only with `auto_bf16` and OpenVINO on a bf16 CPU: torch's bf16 autocast is slower
    than ONNX Runtime fp32 here, so it is opt-in. `bf16` asked explicitly picks OpenVINO under `auto` runtime.
    Raises ModelUnavailable, naming the setting, for a combination that cannot run as asked.
    """
    if precision not in PRECISIONS:
        raise ModelUnavailable(f"MEDSAM2_PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}")
    if device != "cpu":
        if runtime not in ("auto", "torch"):
            raise ModelUnavailable(f"MEDSAM2_RUNTIME={runtime}: runs on the CPU only; the device is {device}")
        if precision == "fp32":
            raise ModelUnavailable(f"MEDSAM2_PRECISION=fp32: on {device} LiteMedSAM runs under bf16 autocast; "
                                   "use auto or bf16, or MEDSAM2_DEVICE=cpu")
        return "torch", "bf16"
    bf16 = cpu_has_bf16() if has_bf16 is None else has_bf16
    if precision == "bf16" and not bf16:
        raise ModelUnavailable(
            "MEDSAM2_PRECISION=bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), where bf16 "
            "would run slower than fp32; use MEDSAM2_PRECISION=auto or fp32")
    has_openvino = openvino_available() if openvino is None else openvino
    if runtime == "auto":
        if bf16 and has_openvino and (precision == "bf16" or (precision == "auto" and auto_bf16)):
            return "openvino", "bf16"
        runtime = _fp32_runtime(has_openvino)
        if precision == "bf16":  # asked for bf16 without OpenVINO: torch autocast is the runtime that has it
            runtime = "torch"
    if runtime == "openvino" and not has_openvino:
        raise ModelUnavailable("MEDSAM2_RUNTIME=openvino: the openvino package is not installed (pip install openvino)")
    if precision == "bf16" and runtime not in BF16_RUNTIMES:
        raise ModelUnavailable(f"MEDSAM2_PRECISION=bf16: MEDSAM2_RUNTIME={runtime} runs fp32 only; "
                               f"use MEDSAM2_RUNTIME=openvino, torch or auto")
    if precision == "auto":
        precision = "bf16" if auto_bf16 and bf16 and runtime == "openvino" else "fp32"
    return runtime, precision


def _fp32_runtime(has_openvino: bool) -> str:
    """The fp32 encoder runtime `auto` picks: OpenVINO where installed (ONNX Runtime's masks on all 15 real
    structures, Dice 1.0000 each; the first request on ct_dicom's liver 1.18x sooner; peak RSS of one engine
    1,231 MB against 1,545: BENCHMARKS.md "bf16 on the CPU", idle rerun), then ONNX Runtime, then torch. The
    box decoder runs on ONNX Runtime under both."""
    if has_openvino:
        return "openvino"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"
