"""Small masked_merge and topdown_epilogue calls, forward and backward, on CUDA, for
`compute-sanitizer --tool memcheck`: every kernel variant (vector widths, both layouts, the
register and the strided epilogue kernels) on odd sizes."""

import torch

from aim_ext.ops import logistic_noise, masked_merge, topdown_epilogue

# (N, C, H, W, h, w): odd sizes (scalar paths), vector-friendly sizes, a coarse map larger than
# the fine one, and a width beyond the register kernel (strided epilogue path).
SHAPES = ((2, 24, 19, 13, 10, 7), (2, 256, 8, 8, 4, 4), (1, 3, 5, 7, 9, 11), (1, 1056, 3, 5, 2, 3))

for n, c, h, w, ch, cw in SHAPES:
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            feat, coarse = (
                torch.randn(*size, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                for size in ((n, c, h, w), (n, c, ch, cw))
            )
            logits = torch.randn(n, 1, h, w, device="cuda", requires_grad=True)
            weight = torch.randn(c, device="cuda", requires_grad=True)
            bias = torch.randn(c, device="cuda", requires_grad=True)
            for noise in (None, logistic_noise(logits)):
                out, mask = masked_merge(feat, logits, coarse, noise=noise)
                (out.float().square().sum() + mask.float().sum()).backward()
                out, mask, features = topdown_epilogue(feat, weight, bias, logits, coarse, noise=noise)
                (out.float().square().sum() + mask.float().sum() + features.float().sum()).backward()
torch.cuda.synchronize()
print("memcheck case ran")
