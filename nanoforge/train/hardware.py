"""The device, its peak FLOP/s for MFU, and whether bf16 autocast pays off on it.

On GPUs the peak comes from a table of known cards (dense bf16 tensor-core figures from the vendors'
datasheets); on a CPU there is no datasheet worth trusting, so the peak is measured with a matmul.
"""

from __future__ import annotations

import functools
import time

import torch

# Dense (no sparsity) bf16 peak FLOP/s; matched in order against torch.cuda.get_device_name (L40S before L40
# before L4).
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from nanoforge.errors import NanoforgeError

        raise NanoforgeError("device cuda requested but no CUDA GPU is available")
    return torch.device(requested)


@functools.cache
def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of an n×n matmul on this CPU (the practical peak)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def gpu_has_bf16() -> bool:
    """Whether this GPU computes bf16 natively (Ampere and later); torch would also say yes where it only
    emulates it (V100, T4), much slower than fp32 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def use_tf32(device: torch.device) -> None:
    """fp32 matmuls and convolutions on a GPU's tensor cores (TF32), as nanoGPT and torchtitan train; the
    fp32 peak that MFU divides by (half the bf16 one) is TF32's. Process-wide: torch's own setting."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of `device` for `dtype`: table lookup on GPUs, measured matmul on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2  # tf32 ≈ half of bf16
        return 100e12
    return measured_matmul_flops(dtype)
