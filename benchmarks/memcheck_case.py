"""Small masked_merge and topdown_epilogue calls, forward and backward, the pooled head's ops and
the mask estimator's kernels, on CUDA, for `compute-sanitizer --tool memcheck`, `racecheck` and
`synccheck`: every kernel variant (vector widths, both layouts, the register and the strided
epilogue kernels; the sparse branch's composed and aligned forms, none, some and all positions
active; the estimator's one and many stem chunks, maps from 1x1 to 14x14) on odd sizes."""

import torch

from aim_ext.ops import (
    logistic_noise,
    mask_estimator,
    masked_merge,
    pooled_epilogue,
    sparse_pooled_branch,
    topdown_epilogue,
)

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

# The pooled head: (N, C, H, W, D); 8 C < 9 D composes the convolutions, otherwise align then refine.
for n, c, h, w, d in ((2, 5, 7, 3, 16), (1, 40, 6, 9, 8), (3, 24, 1, 1, 24)):
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            s = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            aw = torch.randn(d, c, 1, 1, device="cuda", dtype=dtype)
            rw = torch.randn(d, d, 3, 3, device="cuda", dtype=dtype)
            ab, rb, lw, lb = (torch.randn(d, device="cuda", dtype=dtype) for _ in range(4))
            weight = torch.rand(h, w, device="cuda")
            for fraction in (0.0, 0.4, 1.0):
                logits = fraction - torch.rand(n, 1, h, w, device="cuda") if 0 < fraction < 1 else None
                logits = (
                    logits if logits is not None else torch.full((n, 1, h, w), fraction - 0.5, device="cuda")
                )
                sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
                sparse_pooled_branch(s, logits, weight, aw, None, rw, None, lw, lb)
                conv = torch.randn(n, d, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                pooled_epilogue(conv, lw, lb, logits, weight)

# The mask estimator's kernels: (N, C, H, W) with one and several 16-channel stem chunks, a chunk
# cut short, from 1x1 up to the largest maps (20x20; float64 11x11).
for n, c, h, w in (
    (1, 3, 1, 1),
    (2, 17, 5, 9),
    (1, 768, 7, 7),
    (3, 40, 14, 14),
    (1, 5, 11, 11),
    (1, 6, 20, 20),
):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        if dtype == torch.float64 and h * w > 121:
            continue
        for fmt in (torch.contiguous_format, torch.channels_last):
            s = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            convs = [torch.randn(32, 32, 3, 3, device="cuda", dtype=dtype) / 17 for _ in range(6)]
            mask_estimator(
                s,
                torch.randn(32, c, 3, 3, device="cuda", dtype=dtype) / (3 * c**0.5),
                torch.randn(32, device="cuda", dtype=dtype),
                convs,
                [torch.randn(32, device="cuda", dtype=dtype) for _ in convs],
                torch.randn(1, 32, 1, 1, device="cuda", dtype=dtype),
                torch.randn(1, device="cuda", dtype=dtype),
                torch.randn(1, 32, device="cuda", dtype=dtype),
                algorithm="kernel",
            )
torch.cuda.synchronize()
print("memcheck case ran")
