"""What the benchmark ran on, and the peak-FLOPs table that turns throughput into MFU."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets; sparsity excluded).
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device from its name, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        if "PCIe" in name:
            return PEAK_BF16_TFLOPS["H100 PCIe"]
        return PEAK_BF16_TFLOPS["H100 NVL" if "NVL" in name else "H100 SXM"]
    for key in ("H200", "A100"):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} (CPU, {torch.get_num_threads()} threads)"


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while `fn()` runs, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events, summed in time
    order (slow; run it outside any timed window).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak
