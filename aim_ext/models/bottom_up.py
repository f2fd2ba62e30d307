"""Bottom-up masking (paper section 6.1, appendix D.4): the ablation AIM is measured against.

The mask estimators sit inside the backbone. Each masked stage's output S_l is replaced by its
masked copy before the next stage reads it, with no skip connection back to the dense map:

    A_l = M_l(S_l),  B_l = G(A_l),  S_l <- S_l * B_l        (l = stop_stage .. L, in forward order)
    logits = f(mean(S_L * B_L))

`BottomUpAIM(backbone, stop_stage)` masks levels stop_stage..L, the paper's stage choices
[1, 2, 3] (stop_stage 1 on ConvNeXt), [2, 3] and [3]. The classifier is AIM's head (global mean,
dropout, linear) on the masked top level, as AIM's f_final is on P_T; timm's own head (ConvNeXt's
head LayerNorm) is not used, so with every mask on this is the backbone with AIM's classifier, not
the vanilla model. There are no auxiliary heads. The same mask estimator, binary Gumbel and
masked-merge op as AIM's stages, and the same training (Eq. 7 without the auxiliary term).
"""

from __future__ import annotations

from timm.models import FeatureListNet
from torch import Tensor, nn

from aim_ext.models.fusion import fold_for_inference, make_inference_only
from aim_ext.models.heads import ClassifierHead
from aim_ext.models.mask_estimator import MaskEstimator
from aim_ext.models.masking import AIMOutput, MaskingModel, from_nchw, gumbel_sample
from aim_ext.ops import masked_merge


class BottomUpAIM(MaskingModel):
    """`backbone+bottom-up AIM[stop_stage]`: a mask estimator on each backbone level from
    stop_stage to the top, the masked map passed on to the next stage.

    Needs a backbone whose timm ``features_only`` model runs its modules in order (timm's
    FeatureListNet: ConvNeXt, ResNet and most CNNs); the model can then be driven module by
    module.
    """

    def __init__(
        self,
        backbone: str,
        stop_stage: int,
        num_classes: int = 1000,
        *,
        pretrained: bool = False,
        drop_rate: float = 0.3,
        drop_path_rate: float | None = None,
        temperature: float = 1.0,
        gumbel_noise: bool = True,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        channels = self.attach_backbone(
            backbone, stop_stage, pretrained=pretrained, drop_path_rate=drop_path_rate, kwargs=backbone_kwargs
        )
        top = len(channels) - 1
        if not isinstance(self.backbone, FeatureListNet):
            raise ValueError(
                f"bottom-up masking drives the backbone module by module, which needs timm's "
                f"FeatureListNet; {backbone}'s features_only model is {type(self.backbone).__name__}"
            )
        self.stop_stage = stop_stage
        self.num_classes = num_classes
        self.stage_indices = list(range(top, stop_stage - 1, -1))  # top stage first
        self.estimators = nn.ModuleList(MaskEstimator(channels[i]) for i in self.stage_indices)
        self.head = ClassifierHead(channels[top], num_classes, drop_rate)
        self.merged_map = nn.Identity()  # the masked top level, the map the classifier pools
        self.temperature = temperature
        self.gumbel_noise = gumbel_noise

    def architecture_options(self) -> dict:
        return {"masking": "bottom-up"} | self.backbone_options()

    def mask_estimator_modules(self) -> list[nn.Module]:
        return list(self.estimators)

    def forward_masked(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The backbone's modules in order, each masked level's output replaced by S_l * B_l
        before the next module reads it. Returns the masked top level, the masks B_l and the
        logits A_l (top first)."""
        estimators = dict(zip(self.backbone.return_layers, reversed(self.estimators), strict=True))
        masks: list[Tensor] = []
        logits: list[Tensor] = []
        for name, module in self.backbone.items():
            x = module(x)
            estimator = estimators.get(name)
            if estimator is None:
                continue
            s = self.nchw(x)
            a = estimator(s)
            sample = gumbel_sample(a, training=self.training, noise=self.gumbel_noise)
            s, b = masked_merge(s, a, None, noise=sample, temperature=self.temperature)
            x = from_nchw(s, self.feature_layout)
            masks.insert(0, b)
            logits.insert(0, a)
        return self.nchw(x), masks, logits

    def forward_head(self, top: Tensor) -> Tensor:
        """The classifier on the masked top level: global mean, dropout, linear."""
        return self.head(self.merged_map(top).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> AIMOutput | Tensor:
        top, masks, mask_logits = self.forward_masked(x)
        logits = self.forward_head(top)
        return AIMOutput(logits, [], masks, mask_logits) if self.training else logits

    def fuse(self) -> BottomUpAIM:
        """Fuse this model for inference, in place, and return it: the backbone's BatchNorms folded
        into their convolutions, each mask estimator replaced by its inference form, `.train()`
        refused (as `AIM.fuse`)."""
        self.eval()
        fold_for_inference(self.backbone, self.backbone_name)
        self.estimators = nn.ModuleList(estimator.fuse() for estimator in self.estimators)
        return make_inference_only(self)

    def predict(self, x: Tensor, *, merged_map: bool = False):
        """Evaluation logits and the binary masks (N, 1, h, w), top stage first; with
        ``merged_map=True`` also the masked top level the logits are read from."""
        if self.training:
            raise RuntimeError("predict() runs the evaluation model: call model.eval() first")
        top, masks, _ = self.forward_masked(x)
        logits = self.forward_head(top)
        return (logits, masks, top) if merged_map else (logits, masks)
