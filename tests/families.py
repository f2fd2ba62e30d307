"""One small model of every timm family whose ``features_only`` model AIM can use: the table
`tests/test_families.py` runs and `docs/models.md#timm-families` shows.

Each entry is a timm model, the keyword arguments that make it small enough for a test (fewer
blocks, narrower layers, a smaller input where the model fixes its input size), and the input
size. ``core`` entries run in the default test selection; the rest run with
``AIM_EXT_FAMILIES=all`` (``python -m pytest tests/test_families.py`` with it set).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    family: str  # the row's name in docs/models.md
    model: str  # a timm model of the family
    kwargs: dict = field(default_factory=dict)  # what makes it small
    size: int = 64  # the test image's side
    core: bool = False  # in the default test selection
    onnx: str = ""  # why ONNX export cannot work for this family (empty: it works)


# torch.onnx (torch 2.14.1) cannot export these timm backbones themselves, AIM or not.
BACKBONE_ONNX = "torch.onnx cannot export the timm backbone itself"

ONES = (1, 1, 1, 1)
VIT = dict(img_size=64, embed_dim=32, depth=3, num_heads=2)
SWIN = dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))

FAMILIES = [
    # Convolutional networks
    Family("ResNet", "test_resnet", core=True),
    Family("ResNeXt", "resnext50_32x4d", dict(layers=(1, 1, 1, 1), base_width=4, cardinality=4)),
    Family("SE-ResNet (legacy SENet)", "legacy_seresnet18", dict(layers=(1, 1, 1, 1))),
    Family("Res2Net", "res2net50_26w_4s", dict(layers=(1, 1, 1, 1))),
    Family("ResNeSt", "resnest14d", dict(layers=(1, 1, 1, 1))),
    Family("SKNet", "skresnet18", dict(layers=(1, 1, 1, 1))),
    Family("ResNetV2", "resnetv2_18", dict(layers=(1, 1, 1, 1))),
    Family("TResNet", "tresnet_m", dict(layers=(1, 1, 1, 1), width_factor=0.25)),
    Family("RegNet", "regnetx_002"),
    Family("NFNet", "test_nfnet"),
    Family("BYOBNet (RepVGG, GENet, MobileOne)", "test_byobnet"),
    Family("BYOANet (HaloNet, BoTNet, LambdaNet)", "lambda_resnet26t", dict(img_size=64)),
    Family("CSPNet / DarkNet", "cs3darknet_focus_s"),
    Family("CSPNeXt", "cspnext_tiny"),
    Family("DLA", "dla46x_c"),
    Family("DPN", "dpn48b", dict(k_sec=(1, 1, 1, 1))),
    Family("DenseNet", "densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), core=True),
    Family("VGG", "vgg11", core=True),
    Family("VoVNet", "ese_vovnet19b_slim_dw"),
    Family("SelecSLS", "selecsls42"),
    Family("HRNet", "hrnet_w18_small"),
    Family("Inception v3", "inception_v3", size=75),
    Family("Inception v4", "inception_v4", size=75),
    Family("Inception-ResNet v2", "inception_resnet_v2", size=75),
    Family("Xception", "legacy_xception", size=71),
    Family("Xception (aligned)", "xception41p"),
    Family("NASNet", "nasnetalarge"),
    Family("PNASNet", "pnasnet5large", size=64),
    Family("EfficientNet", "test_efficientnet", core=True),
    Family("EfficientNetV2", "tf_efficientnetv2_b0", dict(channel_multiplier=0.25, depth_multiplier=0.25)),
    Family("MobileNetV2", "mobilenetv2_050"),
    Family("MobileNetV3", "mobilenetv3_small_050"),
    Family("MobileNetV4", "mobilenetv4_conv_small_050"),
    Family("MobileNetV5", "mobilenetv5_base", dict(layers=None)),
    Family("HardCoRe-NAS", "hardcorenas_a"),
    Family("GhostNet", "ghostnet_050"),
    Family("RepGhostNet", "repghostnet_050"),
    Family("LCNetV2", "lcnetv2_small"),
    Family("ReXNet", "rexnet_100"),
    Family("HGNet", "hgnetv2_b0"),
    Family("FasterNet", "fasternet_t0"),
    Family("StarNet", "starnet_s050"),
    Family("RDNet", "rdnet_tiny"),
    Family("ConvNeXt", "test_convnext", core=True),
    Family("ConvNeXt V2", "convnextv2_atto", dict(depths=(1, 1, 1, 1))),
    Family("ConvMixer", "convmixer_768_32"),
    Family("InceptionNeXt", "inception_next_atto", dict(depths=(1, 1, 1, 1))),
    Family("MambaOut", "test_mambaout", core=True),
    Family("CPU-bone", "cpubone_nano"),
    # Hybrids and vision transformers with feature pyramids
    Family("EdgeNeXt", "edgenext_xx_small", dict(depths=(1, 1, 1, 1))),
    Family("RepViT", "repvit_m1", dict(depth=(1, 1, 1, 1))),
    Family("FastViT", "fastvit_t8", dict(layers=(1, 1, 1, 1))),
    Family("MetaFormer: PoolFormer", "poolformerv2_s12"),
    Family("MetaFormer: CAFormer", "caformer_s18"),
    Family("MetaFormer: ConvFormer", "convformer_s18"),
    Family("MaxViT", "test_maxvit", dict(img_size=64), onnx=BACKBONE_ONNX),
    Family("CoAtNet", "test_coatnet", dict(img_size=64)),
    Family("PVTv2", "pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    Family("MViTv2", "mvitv2_tiny", dict(img_size=64)),
    Family("EfficientViT (MIT)", "efficientvit_b0", dict(depths=(1, 1, 1, 1, 1))),
    Family("EfficientViT (MSRA)", "efficientvit_m0", dict(img_size=64, depth=(1, 1, 1))),
    Family("EfficientVim", "efficientvim_m1", dict(depths=(1, 1, 1))),
    Family("EfficientFormer", "efficientformer_l1", size=224),
    Family("EfficientFormerV2", "efficientformerv2_s0", dict(img_size=64)),
    Family("LeViT", "levit_128s", dict(img_size=64)),
    Family("Hiera", "hiera_tiny_224", dict(img_size=(64, 64), stages=(1, 1, 1, 1)), onnx=BACKBONE_ONNX),
    Family("Hiera (SAM 2)", "sam2_hiera_tiny", dict(stages=(1, 1, 1, 1), global_att_blocks=())),
    Family("Swin", "swin_tiny_patch4_window7_224", SWIN, core=True),
    Family("Swin V2", "swinv2_tiny_window8_256", SWIN),
    Family(
        "Swin V2 (CR)", "swinv2_cr_tiny_224", dict(img_size=(64, 64), window_size=(2, 2), depths=(1, 1, 1, 1))
    ),
    Family(
        "DaViT", "davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 2))
    ),
    Family("FocalNet", "focalnet_tiny_srf"),
    Family("GCViT", "gcvit_xxtiny", dict(img_size=64)),
    Family("NesT", "nest_tiny", dict(img_size=64), onnx=BACKBONE_ONNX),
    Family("Twins", "twins_svt_small", dict(img_size=64, depths=(1, 1, 1, 1)), onnx=BACKBONE_ONNX),
    Family("TinyViT", "tiny_vit_5m_224", dict(depths=(1, 1, 1, 1))),
    Family("CoaT", "coat_tiny", dict(img_size=64, serial_depths=(1, 1, 1, 1))),
    Family("PiT", "pit_ti_224", dict(img_size=64)),
    Family("Visformer", "visformer_tiny", dict(img_size=64)),
    Family("NextViT", "nextvit_small"),
    Family("MobileViT", "mobilevit_xxs"),
    Family("iFormer", "iformer_t"),
    Family("LowFormer", "lowformer_b0"),
    Family("SHViT", "shvit_s1", dict(depth=(1, 1, 1))),
    Family("SwiftFormer", "swiftformer_xs"),
    Family("Sequencer", "sequencer2d_s"),
    Family("CSATv2", "csatv2"),
    Family("ViTamin", "vitamin_small_224", dict(img_size=64)),
    # Single-scale transformers and MLPs: every level at one resolution
    Family("ViT", "test_vit", core=True),
    Family("DeiT", "deit_tiny_patch16_224", VIT),
    Family("ViT (relative position)", "test_vit_relpos", dict(img_size=64), onnx=BACKBONE_ONNX),
    Family("ViT hybrid (ResNet stem)", "vit_tiny_r_s16_p8_224", dict(img_size=64, depth=3)),
    Family(
        "ViT-SAM",
        "samvit_base_patch16_224",
        dict(VIT, global_attn_indexes=()),
        onnx=BACKBONE_ONNX,
    ),
    Family("BEiT", "beit_base_patch16_224", VIT, onnx=BACKBONE_ONNX),
    Family("EVA", "vit_tiny_patch16_dinov3_qkvb", VIT),
    Family("CaiT", "cait_xxs24_224", dict(img_size=64, embed_dim=32, depth=3, num_heads=2)),
    Family("ConViT", "convit_tiny", dict(img_size=64, embed_dim=32, depth=3, num_heads=2)),
    Family("CrossViT", "crossvit_tiny_240", size=240),
    Family("TNT", "tnt_s_legacy_patch16_224", dict(img_size=64, depth=3)),
    Family("XCiT", "xcit_nano_12_p8_224", dict(img_size=64, depth=3)),
    Family("VOLO", "volo_d1_224", dict(img_size=64)),
    Family("MLP-Mixer / gMLP / ResMLP", "gmlp_ti16_224", dict(img_size=64)),
    Family("NaFlexViT", "naflexvit_base_patch16_parfac_gap", VIT),
    Family("DeepSeek ViT", "deepseek_vit_412m", dict(VIT, img_size=56), size=56),
    Family(
        "Gemma 4 ViT",
        "gemma4_vit_167m",
        VIT,
        onnx="its data-dependent .item() sends torch.onnx to draft export, which keeps the AIM ops",
    ),
    Family("Qwen3 ViT", "qwen3_vit_88m", VIT),
]
