"""Throughput bookkeeping: model FLOPs utilisation (MFU) against the device's peak.

``mfu = flops_per_token × tokens_per_s ÷ (peak FLOP/s per device × devices)``, with the
model's own ``flops_per_token()`` (forward + backward). The peak assumed is the dense
(no sparsity) tensor-core throughput of the vendor's data sheet for the compute dtype:
bfloat16/float16, or TF32 for float32 (the trainer allows TF32 matmuls). A device not in
the table, and any CPU, has no meaningful peak: ``mfu`` is then logged as null.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), peak bf16/fp16 FLOP/s, peak TF32 FLOP/s).
# First match wins, so the specific names come before the generic ones.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4e12, 494.7e12),
    ("H100 PCIe", 756.0e12, 378.0e12),
    ("H100 NVL", 835.0e12, 417.5e12),
    ("H100", 989.4e12, 494.7e12),  # SXM
    ("GH200", 989.4e12, 494.7e12),
    ("A100", 312.0e12, 156.0e12),
    ("A800", 312.0e12, 156.0e12),
    ("H800", 989.4e12, 494.7e12),
    ("L40S", 362.0e12, 183.0e12),
    ("L40", 181.0e12, 90.5e12),
    ("L4", 121.0e12, 60.0e12),
    ("A10", 125.0e12, 62.5e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71.0e12, 35.6e12),
    ("V100", 125.0e12, 15.7e12),  # no bf16 / TF32: fp16 tensor cores, fp32 CUDA cores
    ("T4", 65.0e12, 8.1e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one ``device`` for matmuls in ``dtype``; None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, n_devices: int) -> float | None:
    """Fraction of the peak the run achieves, or None without a known peak."""
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)
