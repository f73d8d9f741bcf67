"""Launch helpers shared by the fused row/elementwise Triton kernels."""

import torch


def grid_programs(x: torch.Tensor, rows: int) -> int:
    """Programs for a row-looping backward: a few per SM on a GPU (enough to fill it while
    keeping the (programs, H) partial-gradient buffer small), 4 in the interpreter."""
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))
