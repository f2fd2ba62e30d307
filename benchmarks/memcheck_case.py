"""A small masked_merge forward and backward on CUDA, for `compute-sanitizer --tool memcheck`."""

import torch

from aim_ext.ops import logistic_noise, masked_merge

for dtype in (torch.float32, torch.bfloat16):
    for fmt in (torch.contiguous_format, torch.channels_last):
        feat = (
            torch.randn(2, 24, 19, 13, device="cuda", dtype=dtype)
            .contiguous(memory_format=fmt)
            .requires_grad_()
        )
        logits = torch.randn(2, 1, 19, 13, device="cuda", requires_grad=True)
        coarse = (
            torch.randn(2, 24, 10, 7, device="cuda", dtype=dtype)
            .contiguous(memory_format=fmt)
            .requires_grad_()
        )
        for noise in (None, logistic_noise(logits)):
            out, mask = masked_merge(feat, logits, coarse, noise=noise)
            (out.float().square().sum() + mask.float().sum()).backward()
torch.cuda.synchronize()
print("memcheck case ran")
