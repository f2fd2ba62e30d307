"""The AIM model: a timm `features_only` backbone plus the top-down masking pathway."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aim_ext.models.concurrency import can_run_concurrently, fork, join, tracing
from aim_ext.models.fusion import fold_for_inference, is_inference_only, make_inference_only
from aim_ext.models.heads import ClassifierHead, masked_avg_pool
from aim_ext.models.mask_estimator import MaskEstimator
from aim_ext.models.masking import AIMOutput, MaskingModel, gumbel_sample
from aim_ext.models.sparsity import check_sparse_mode, prefer_sparse
from aim_ext.models.topdown import TOPDOWN_WIDTH, FeatureBranch, StageOutput, TopDownStage
from aim_ext.ops import pool_weights
from aim_ext.ops.masked_merge import acc_dtype

HEAD_DROP_RATE = 0.3
# Where the stages' masks come from: a mask estimator at every stage (the paper's AIM), or one at the
# top stage whose mask every lower stage takes, nearest-upsampled (the ablation of appendix D.3).
MASK_ESTIMATORS = ("every", "top")


class AIM(MaskingModel):
    """`backbone+AIM[stop_stage]`: top-down stages from the top backbone stage L down to stop_stage.

    In training mode `forward` returns an `AIMOutput`; in evaluation mode the final logits, as a
    timm model does. `predict` gives the evaluation logits and the binary masks.

    Evaluation computes the logits with the pooled head: mean(P_T) as each stage's masked features
    weighted by their footprint in P_T (aim_ext.ops.pooled_head), so P_T itself is never built.
    It is built, and the logits read from it, when something looks at it: a hook on
    `merged_map` (GradCAM), `predict(x, merged_map=True)`, or autograd recording (the pooled
    ops compute no gradients). Both give the same logits to rounding.
    """

    def __init__(
        self,
        backbone: str,
        stop_stage: int,
        num_classes: int = 1000,
        *,
        pretrained: bool = False,
        drop_rate: float = HEAD_DROP_RATE,
        drop_path_rate: float | None = None,
        width: int = TOPDOWN_WIDTH,
        temperature: float = 1.0,
        gumbel_noise: bool = True,
        mask_estimators: str = "every",
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        if mask_estimators not in MASK_ESTIMATORS:
            raise ValueError(f"mask_estimators must be one of {MASK_ESTIMATORS}, got {mask_estimators!r}")
        channels = self.attach_backbone(
            backbone, stop_stage, pretrained=pretrained, drop_path_rate=drop_path_rate, kwargs=backbone_kwargs
        )
        top = len(channels) - 1
        self.stop_stage = stop_stage
        self.num_classes = num_classes
        self.width = width
        self.stage_indices = list(range(top, stop_stage - 1, -1))  # top stage first
        self.mask_estimators = mask_estimators
        self.stages = nn.ModuleList(
            TopDownStage(channels[i], width, mask_estimator=k == 0 or mask_estimators == "every")
            for k, i in enumerate(self.stage_indices)
        )
        self.aux_heads = nn.ModuleList(
            ClassifierHead(width, num_classes, drop_rate) for _ in self.stage_indices
        )
        self.head = ClassifierHead(width, num_classes, drop_rate)
        # P_T as a module output, so that layer attributions (GradCAM) can hook the map the
        # classifier sees.
        self.merged_map = nn.Identity()
        self.temperature = temperature
        self.gumbel_noise = gumbel_noise
        self.aux_heads_on = True  # set_aux_heads
        self._weights_cache: dict = {}  # the pooled head's w_l per (stage sizes, device, dtype)
        self.branches_used: list[str] = []

    # In inference on CUDA, run the stages' mask estimators and feature branches concurrently on
    # side streams (same results; see aim_ext.models.concurrency). Set False for one stream.
    concurrent_branches = True
    # How evaluation computes each stage's feature branch: "auto" (aim_ext.models.sparsity's
    # measured policy), "on" (sparse wherever the branch allows) or "off" (dense).
    sparse_inference = "auto"
    # Evaluation reads the logits from the pooled head (no P_T); False: always from P_T.
    pooled_head = True

    def architecture_options(self) -> dict:
        options = {} if self.mask_estimators == "every" else {"mask_estimators": self.mask_estimators}
        return options | self.backbone_options()

    def mask_estimator_modules(self) -> list[nn.Module]:
        return [stage.mask_estimator for stage in self.stages if stage.mask_estimator is not None]

    def set_aux_heads(self, on: bool) -> None:
        """Whether training computes the auxiliary heads f_l. Off (the paper's "no auxiliary
        losses" ablation, `aux_weight 0`), training returns no aux logits and the heads' weights
        take no gradient (they stay as they are; evaluation never uses them)."""
        self.aux_heads_on = bool(on)
        self.aux_heads.requires_grad_(self.aux_heads_on)

    def stage_inputs(self, x: Tensor) -> list[Tensor]:
        """S_l of every top-down stage, top stage first: the backbone's feature maps, (N, C, H, W)
        whatever layout the backbone hands them over in."""
        feats = self.backbone(x)  # stages stop_stage..L
        return [self.nchw(feats[index - self.stop_stage]) for index in self.stage_indices]

    def forward_topdown(self, x: Tensor) -> list[StageOutput]:
        """Run the backbone and the top-down pathway; the last stage's `merged` is P_T."""
        inputs = self.stage_inputs(x)
        if self.mask_estimators == "top":
            return self._merge_top_mask(inputs)
        if self.concurrent_branches and can_run_concurrently(x):
            return self._merge_concurrent_branches(inputs)
        outputs: list[StageOutput] = []
        coarse = None
        for stage, s in zip(self.stages, inputs, strict=True):
            out = stage(s, coarse, temperature=self.temperature, noise=self.gumbel_noise)
            outputs.append(out)
            coarse = out.merged
        return outputs

    def _merge_top_mask(self, inputs: list[Tensor]) -> list[StageOutput]:
        """`forward_topdown`'s loop with one mask estimator (appendix D.3): the top stage's A and,
        in training, its logistic noise are nearest-upsampled to each lower stage, so every stage
        applies the top stage's binary mask B_L, upsampled; the straight-through gradient of every
        stage's mask reaches the one estimator."""
        top = inputs[0]
        logits = self.stages[0].mask_estimator(top)
        sample = gumbel_sample(logits, training=self.training, noise=self.gumbel_noise)
        outputs: list[StageOutput] = []
        coarse = None
        for stage, s in zip(self.stages, inputs, strict=True):
            out = stage.merge(
                upsample_mask(logits, s),
                stage.feature_branch(s),
                coarse,
                temperature=self.temperature,
                noise=self.gumbel_noise,
                sample=None if sample is None else upsample_mask(sample, s),
            )
            outputs.append(out)
            coarse = out.merged
        return outputs

    def _merge_concurrent_branches(self, inputs: list[Tensor]) -> list[StageOutput]:
        """`forward_topdown`'s loop with every stage's M_l and T_l started at once on side streams
        (`aim_ext.models.concurrency`); the merges run in order on the current stream."""
        launched = fork(
            [
                job
                for stage, s in zip(self.stages, inputs, strict=True)
                for job in (partial(stage.mask_estimator, s), partial(stage.feature_branch, s))
            ]
        )
        outputs: list[StageOutput] = []
        coarse = None
        for k, stage in enumerate(self.stages):
            logits, branch = join(*launched[2 * k]), join(*launched[2 * k + 1])
            out = stage.merge(logits, branch, coarse, temperature=self.temperature, noise=self.gumbel_noise)
            outputs.append(out)
            coarse = out.merged
        return outputs

    def forward_head(self, merged: Tensor) -> Tensor:
        """The final classifier f_final on the merged top-down map P_T (Eq. 5)."""
        return self.head(self.merged_map(merged).mean(dim=(2, 3)))

    def builds_merged_map(self) -> bool:
        """Whether evaluation builds P_T: `pooled_head` is off, something hooks `merged_map`, or
        autograd records."""
        if not self.pooled_head:
            return True
        hooked = bool(
            self.merged_map._forward_hooks
            or self.merged_map._forward_pre_hooks
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
        )
        return hooked or (torch.is_grad_enabled() and not is_inference_only(self))

    def forward_pooled(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Evaluation logits and masks by the pooled head: f_final(sum_l sum_p w_l(p) O_l(p))."""
        inputs = self.stage_inputs(x)
        weights = self._pool_weights(inputs)
        if self.mask_estimators == "every" and self.concurrent_branches and can_run_concurrently(x):
            branches = self._launch_pool_inputs(inputs)
        else:
            top = self.stages[0].mask_estimator(inputs[0]) if self.mask_estimators == "top" else None
            branches = [
                partial(self._pool_input, stage, s, top) for stage, s in zip(self.stages, inputs, strict=True)
            ]
        total, masks, used = None, [], []
        for stage, weight, branch in zip(self.stages, weights, branches, strict=True):
            logits, pool_input, sparse = branch()
            used.append("sparse" if sparse else "dense")
            pooled, mask = stage.pool(logits, pool_input, sparse, weight)
            total = pooled if total is None else total + pooled
            masks.append(mask)
        if not tracing():
            self.branches_used = used  # for reports: each stage's branch in the last eager call
        return self.head(total.to(inputs[-1].dtype)), masks

    def _pool_input(
        self, stage: TopDownStage, s: Tensor, top: Tensor | None = None
    ) -> tuple[Tensor, Tensor, bool]:
        """A stage's mask logits (with one estimator: ``top``, the top stage's, upsampled), then
        its choice of branch and that branch's input to `pool`."""
        logits = stage.mask_estimator(s) if top is None else upsample_mask(top, s)
        sparse = self._sparse(stage, s, logits)
        return logits, stage.pool_input(s, sparse), sparse

    def _launch_pool_inputs(self, inputs: list[Tensor]) -> list:
        """`_pool_input` of every stage started at once on side streams (the choice of branch on
        CUDA needs no logits, sparsity.py); each result is joined when its stage pools."""
        sparse = [self._sparse(stage, s, None) for stage, s in zip(self.stages, inputs, strict=True)]
        launched = fork(
            [
                job
                for stage, s, sp in zip(self.stages, inputs, sparse, strict=True)
                for job in (partial(stage.mask_estimator, s), partial(stage.pool_input, s, sp))
            ]
        )
        return [
            partial(lambda k: (join(*launched[2 * k]), join(*launched[2 * k + 1]), sparse[k]), k)
            for k in range(len(inputs))
        ]

    def _sparse(self, stage: TopDownStage, s: Tensor, logits: Tensor | None) -> bool:
        mode = check_sparse_mode(self.sparse_inference)
        if mode == "off" or not stage.can_run_sparse():
            return False
        return mode == "on" or (logits is not None and prefer_sparse(s, logits))

    def _pool_weights(self, inputs: list[Tensor]) -> list[Tensor]:
        """w_l in the accumulation type on the input's device, kept per sizes, device and dtype;
        while a tracer runs (export, compile, fake tensors) made afresh and not kept."""
        sizes = tuple(tuple(s.shape[-2:]) for s in inputs)
        key = (sizes, inputs[-1].device, acc_dtype(inputs[-1]))
        traced = tracing() or isinstance(inputs[-1], torch._subclasses.FakeTensor)
        weights = None if traced else self._weights_cache.get(key)
        if weights is None:
            weights = [w.to(device=key[1], dtype=key[2]) for w in pool_weights(sizes)]
            if not traced:
                self._weights_cache[key] = weights
        return weights

    def forward(self, x: Tensor) -> AIMOutput | Tensor:
        if not self.training and not self.builds_merged_map():
            return self.forward_pooled(x)[0]
        stages = self.forward_topdown(x)
        logits = self.forward_head(stages[-1].merged)
        if not self.training:
            return logits
        aux = [
            head(masked_avg_pool(s.features, s.mask))
            for head, s in zip(self.aux_heads, stages, strict=True)
            if self.aux_heads_on
        ]
        estimated = 1 if self.mask_estimators == "top" else None
        return AIMOutput(logits, aux, [s.mask for s in stages], [s.mask_logits for s in stages], estimated)

    def predict(
        self, x: Tensor, *, merged_map: bool = False
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], Tensor]:
        """Evaluation logits and the binary masks (N, 1, h, w), top stage first; with
        ``merged_map=True`` also P_T (N, 256, h, w), the map the logits are read from."""
        if self.training:
            raise RuntimeError("predict() runs the evaluation model: call model.eval() first")
        if not merged_map and not self.builds_merged_map():
            return self.forward_pooled(x)
        stages = self.forward_topdown(x)
        logits, masks = self.forward_head(stages[-1].merged), [s.mask for s in stages]
        return (logits, masks, stages[-1].merged) if merged_map else (logits, masks)

    def fuse(self) -> AIM:
        """Fuse this model for inference, in place, and return it (timm's ``reparameterize_model``
        calls this on an AIM model nested in another): the backbone's BatchNorms folded into their
        convolutions, each mask estimator and feature branch replaced by its inference form,
        `.train()` refused. `aim_ext.fuse_for_inference` does the same on a copy."""
        self.eval()
        fold_for_inference(self.backbone, self.backbone_name)
        for stage in self.stages:
            if isinstance(stage.mask_estimator, MaskEstimator):
                stage.mask_estimator = stage.mask_estimator.fuse()
            if type(stage.features) is FeatureBranch and stage.features.standard_convolutions():
                stage.features = stage.features.fuse()
        return make_inference_only(self)


def upsample_mask(values: Tensor, like: Tensor) -> Tensor:
    """Mask logits or noise (N, 1, h, w) nearest-upsampled to ``like``'s spatial size: the merge's
    own resize, so an upsampled binary mask covers the same image area."""
    if values.shape[-2:] == like.shape[-2:]:
        return values
    return F.interpolate(values, size=like.shape[-2:], mode="nearest")
