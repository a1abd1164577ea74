"""Whether an adaptation fits its device, asked before anything large is allocated: a job that cannot fit should
fail in seconds with the numbers, not after minutes of loading with an allocator error."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.engine.errors import EngineError, ErrorCode

GIB = 1 << 30
CGROUP = Path("/sys/fs/cgroup")


def resident_bytes(shared_numel: int, n_tasks: int, vector_dtype: torch.dtype) -> int:
    """What the optimisation keeps on the device for its whole run: theta_0, the merged tensors and their gradient
    in float32, and every task vector in the compute dtype."""
    vector_bytes = torch.empty(0, dtype=vector_dtype).element_size()
    return shared_numel * (3 * 4 + n_tasks * vector_bytes)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on the device: the CUDA allocator's view, or on the CPU the smaller of the kernel's available
    memory and what the container's cgroup (v2 or v1) still allows; None where none can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        try:
            limit = (CGROUP / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
                limits.append(int(limit) - int((CGROUP / usage_file).read_text()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_fits(shared_numel: int, n_tasks: int, vector_dtype: torch.dtype, device: torch.device) -> None:
    need, free = resident_bytes(shared_numel, n_tasks, vector_dtype), free_bytes(device)
    if free is not None and need > free:
        dtype = str(vector_dtype).removeprefix("torch.")
        hint = "; compute_dtype bfloat16 halves the task vectors" if vector_dtype == torch.float32 else ""
        raise EngineError(
            ErrorCode.INSUFFICIENT_MEMORY,
            f"the adaptation needs at least {need / GIB:.2f} GiB on {device} ({n_tasks} task vectors of "
            f"{shared_numel:,} parameters in {dtype}, plus theta_0, the merged model and its gradient in float32, "
            f"before activations) and {free / GIB:.2f} GiB is free: merge fewer tasks per job or use a larger "
            f"device{hint}", {"device": str(device), "needed_bytes": need, "free_bytes": free})


def out_of_memory(device: torch.device, batch_size: int, max_length: int) -> EngineError:
    """The resident tensors fitted, so what overflowed is a batch's activations."""
    return EngineError(
        ErrorCode.INSUFFICIENT_MEMORY,
        f"{device} ran out of memory during the adaptation, on the activations of a batch of {batch_size} inputs "
        f"(up to {max_length} tokens each): lower batch_size or max_length", {"device": str(device)})
