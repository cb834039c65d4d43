"""The autocast type a run trains in (``--amp``), decided from what the device runs natively.

Mixed precision only pays where the hardware has the arithmetic: CUDA GPUs run float16 (with a
``GradScaler``, since float16 gradients underflow) and, from compute capability 8.0 (Ampere), bfloat16,
which has float32's range and needs no scaler. A CPU runs bfloat16 convolutions and matrix products
natively only with AVX-512 BF16 or AMX (x86) or the BF16 extension (Arm); elsewhere oneDNN emulates
them and training gets slower, so ``auto`` keeps float32 there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

AMP_CHOICES = ("auto", "off", "fp16", "bf16", "on")
# /proc/cpuinfo flags of CPUs that compute in bfloat16 natively: AVX-512 BF16 and AMX (x86), BF16 (Arm's
# "Features" line). torch.backends.cpu.get_cpu_capability() cannot tell: it names the vector width ATen
# dispatches to ("AVX512" alike on CPUs with and without BF16), and the private
# torch.ops.mkldnn._is_mkldnn_bf16_supported() is also true on AVX-512 CPUs without BF16, where oneDNN
# emulates it. The kernel's flags come from CPUID itself, are public, and read the same under every torch.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags the kernel reports (x86 ``flags``, Arm ``Features``); empty off Linux."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bfloat16 natively (the probe ``--amp auto`` asks on CPU)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def cuda_has_native_bf16() -> bool:
    """True on GPUs of compute capability 8.0 or later (emulated bfloat16 on older ones is slow)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


class AmpChoice(NamedTuple):
    dtype: torch.dtype | None  # the autocast type; None: float32
    reason: str
    native: bool  # False: the device emulates the type, and training gets slower rather than faster


def amp_choice(amp: str, device: torch.device) -> AmpChoice:
    """``--amp`` resolved on ``device``.

    auto: CUDA bfloat16 where native, else float16; CPU bfloat16 where native, else off. fp16 and bf16
    are taken as asked (bf16 on a GPU without it stops the run); on: the device's usual type (float16 on
    CUDA, bfloat16 on CPU), as before fp16 and bf16 existed.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    cuda = device.type == "cuda"
    if amp == "off":
        return AmpChoice(None, "--amp off", True)
    if amp == "auto":
        if cuda and cuda_has_native_bf16():
            return AmpChoice(torch.bfloat16, "--amp auto: this GPU has native bfloat16, no GradScaler needed", True)
        if cuda:
            return AmpChoice(torch.float16, "--amp auto: this GPU has no native bfloat16; float16, GradScaler", True)
        if cpu_has_native_bf16():
            return AmpChoice(torch.bfloat16, "--amp auto: this CPU has native bfloat16", True)
        return AmpChoice(None, "--amp auto: this CPU has no native bfloat16", True)
    if amp == "fp16" or (amp == "on" and cuda):
        if cuda:
            return AmpChoice(torch.float16, f"--amp {amp}: float16 with a GradScaler", True)
        return AmpChoice(torch.float16, f"--amp {amp}: float16 with a GradScaler, emulated on most CPUs", False)
    if cuda and not cuda_has_native_bf16():
        raise SystemExit(f"--amp {amp}: this GPU has no native bfloat16 (compute capability below 8.0); "
                         "use --amp fp16 or auto")  # fmt: skip
    if cuda or cpu_has_native_bf16():
        return AmpChoice(torch.bfloat16, f"--amp {amp}: bfloat16", True)
    return AmpChoice(torch.bfloat16, f"--amp {amp}: bfloat16, emulated: this CPU has no native bfloat16", False)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``--amp amp`` on ``device`` (None: float32)."""
    return amp_choice(amp, device).dtype


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """float16 needs its loss scaled against gradient underflow; bfloat16 and float32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
