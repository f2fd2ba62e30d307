"""The AIM model: a timm `features_only` backbone plus the top-down masking pathway."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import timm
from torch import Tensor, nn

from aim_ext.models.concurrency import can_run_concurrently, fork, join
from aim_ext.models.heads import ClassifierHead, masked_avg_pool
from aim_ext.models.topdown import TOPDOWN_WIDTH, StageOutput, TopDownStage

HEAD_DROP_RATE = 0.3


class AIMOutput(NamedTuple):
    """What an AIM model returns in training mode; every list is ordered top stage first."""

    logits: Tensor  # f_final(P_T), (N, classes)
    aux_logits: list[Tensor]  # f_l(O_l) per stage
    masks: list[Tensor]  # B_l, (N, 1, h_l, w_l), binary, straight-through differentiable
    mask_logits: list[Tensor]  # A_l, (N, 1, h_l, w_l)


class AIM(nn.Module):
    """`backbone+AIM[stop_stage]`: top-down stages from the top backbone stage L down to stop_stage.

    In training mode `forward` returns an `AIMOutput`; in evaluation mode the final logits, as a
    timm model does. `predict` gives the evaluation logits and the binary masks.
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
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        if drop_path_rate is not None:
            backbone_kwargs["drop_path_rate"] = drop_path_rate
        self.backbone = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, **backbone_kwargs
        )
        channels = self.backbone.feature_info.channels()
        top = len(channels) - 1
        if isinstance(stop_stage, bool) or not isinstance(stop_stage, int) or not 0 <= stop_stage <= top:
            raise ValueError(
                f"{backbone} has feature stages 0..{top} (channels {channels}); "
                f"stop_stage={stop_stage!r} is not one of them"
            )
        self.backbone_name = backbone
        self.stop_stage = stop_stage
        self.num_classes = num_classes
        self.stage_indices = list(range(top, stop_stage - 1, -1))  # top stage first
        self.stages = nn.ModuleList(TopDownStage(channels[i], width) for i in self.stage_indices)
        self.aux_heads = nn.ModuleList(
            ClassifierHead(width, num_classes, drop_rate) for _ in self.stage_indices
        )
        self.head = ClassifierHead(width, num_classes, drop_rate)
        # P_T as a module output, so that layer attributions (GradCAM) can hook the map the
        # classifier sees.
        self.merged_map = nn.Identity()
        self.temperature = temperature
        self.gumbel_noise = gumbel_noise
        self.pretrained_cfg = dict(self.backbone.pretrained_cfg)
        self.default_cfg = self.pretrained_cfg

    # In inference on CUDA, run the stages' mask estimators and feature branches concurrently on
    # side streams (same results; see aim_ext.models.concurrency). Set False for one stream.
    concurrent_branches = True

    def set_gumbel(self, *, temperature: float | None = None, noise: bool | None = None) -> None:
        """Set the Gumbel temperature and whether training draws noise (evaluation never does)."""
        if temperature is not None:
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            self.temperature = float(temperature)
        if noise is not None:
            self.gumbel_noise = bool(noise)

    def forward_topdown(self, x: Tensor) -> list[StageOutput]:
        """Run the backbone and the top-down pathway; the last stage's `merged` is P_T."""
        feats = self.backbone(x)
        inputs = [feats[index] for index in self.stage_indices]
        if self.concurrent_branches and can_run_concurrently(x):
            return self._merge_concurrent_branches(inputs)
        outputs: list[StageOutput] = []
        coarse = None
        for stage, s in zip(self.stages, inputs, strict=True):
            out = stage(s, coarse, temperature=self.temperature, noise=self.gumbel_noise)
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

    def forward(self, x: Tensor) -> AIMOutput | Tensor:
        stages = self.forward_topdown(x)
        logits = self.forward_head(stages[-1].merged)
        if not self.training:
            return logits
        aux = [
            head(masked_avg_pool(s.features, s.mask)) for head, s in zip(self.aux_heads, stages, strict=True)
        ]
        return AIMOutput(logits, aux, [s.mask for s in stages], [s.mask_logits for s in stages])

    def predict(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Evaluation logits and the binary masks (N, 1, h, w), top stage first."""
        if self.training:
            raise RuntimeError("predict() runs the evaluation model: call model.eval() first")
        stages = self.forward_topdown(x)
        return self.forward_head(stages[-1].merged), [s.mask for s in stages]
