"""Step inputs from the host to the device.

A step's inputs are numpy arrays (engine/batch.py). On CPU a tensor is the array itself (zero-copy). On an
accelerator they are packed into one host buffer (pinned on CUDA, so the copy is asynchronous) and copied
with one host-to-device transfer; each input is then a view of the device copy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}
ALIGN = 8  # bytes: every view starts aligned for its dtype


def arrays_to_device(arrays: Sequence[np.ndarray], device: torch.device, stage: bool | None = None) -> list[torch.Tensor]:
    """int64, int32 and float32 arrays as tensors of the same dtypes and shapes on `device`, in one copy.
    `stage` (default: off the CPU) packs them through the host buffer (tests do so on CPU)."""
    if not (device.type != "cpu" if stage is None else stage):
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    offsets, size = [], 0
    for a in arrays:
        offsets.append(size)
        size += -(-a.nbytes // ALIGN) * ALIGN
    # A fresh pinned buffer per step: torch's caching host allocator reuses it only once its copy is done.
    staged = torch.empty(max(size, ALIGN), dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = staged.numpy()
    for a, at in zip(arrays, offsets):
        host[at : at + a.nbytes].view(a.dtype)[:] = a.reshape(-1)
    on_device = staged.to(device, non_blocking=True)
    return [on_device[at : at + a.nbytes].view(TORCH_DTYPES[a.dtype]).view(a.shape) for a, at in zip(arrays, offsets)]
