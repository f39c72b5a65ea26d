"""timm and torchvision image models as their libraries build them (tiny configs, random
weights, float64), in train mode: dropout and drop-path masks drawn the same way for the loop
and for jacext (common.seeded); BatchNorm on its running statistics (batchnorm="eval").
BatchGrad, BatchL2Grad, ClipGrad and BatchJacobian of the logits against the loops."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from .common import check_extensions

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")

N, CLASSES = 8, 3


def _check(model, size=16, train=True, **options):
    x, y = torch.randn(N, 3, size, size), torch.randint(0, CLASSES, (N,))
    model.train(train)
    check_extensions(model, lambda: model(x), lambda out: F.cross_entropy(out, y), N, jacobian=True, **options)


def _vit_kwargs(**kwargs):
    return dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=CLASSES,
                drop_rate=0.1, drop_path_rate=0.1, **kwargs)


@pytest.mark.parametrize("train", MODES)
def test_timm_deit3_layer_scale(train):
    """LayerScale (ls1.gamma, ls2.gamma), drop path; the root owns cls_token and pos_embed (no cls
    position): each differentiated at the operation where it meets the batch."""
    _check(timm.create_model("deit3_small_patch16_224", init_values=0.5, **_vit_kwargs()), train=train)


def test_timm_beit():
    """Relative position bias tables; qkv as F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))."""
    _check(timm.create_model("beit_base_patch16_224", init_values=0.5, **_vit_kwargs()))


def test_timm_swin():
    """Window attention on (N windows, tokens, D); relative position bias; 8 x 8 tokens = N per row."""
    _check(timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, window_size=4,
                             embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=CLASSES,
                             drop_rate=0.1, drop_path_rate=0.1))


@pytest.mark.parametrize("train", MODES)
def test_timm_convnext(train):
    """ConvNeXtBlock's gamma, a parameter of the block itself (a meet with the batch); drop path."""
    _check(timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), patch_size=2, kernel_sizes=3,
                                         ls_init_value=0.5, num_classes=CLASSES, drop_rate=0.1, drop_path_rate=0.1),
           size=32, train=train)


def _arch(*stages):
    from timm.models._efficientnet_builder import decode_arch_def

    return decode_arch_def([[s] for s in stages])


def test_timm_efficientnet_batchnorm_act():
    """BatchNormAct2d (SiLU in place) in train mode with batchnorm="eval"; squeeze-excite; drop path."""
    model = timm.models.efficientnet.EfficientNet(
        _arch("ds_r1_k3_s1_e1_c8", "ir_r1_k3_s2_e2_c8_se0.25", "ir_r1_k5_s2_e2_c16_se0.25"),
        num_classes=CLASSES, stem_size=8, num_features=32, drop_rate=0.1, drop_path_rate=0.1)
    _check(model, batchnorm="eval")


def test_timm_mobilenetv3():
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite

    model = timm.models.mobilenetv3.MobileNetV3(
        _arch("ds_r1_k3_s2_e1_c8_se0.25_nre", "ir_r1_k3_s2_e2_c8_nre", "ir_r1_k5_s2_e2_c16_se0.25", "cn_r1_k1_s1_c32"),
        num_classes=CLASSES, stem_size=8, num_features=32, drop_rate=0.1, drop_path_rate=0.1,
        act_layer=get_act_layer("hard_swish"), se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid"))
    _check(model, batchnorm="eval")


def test_torchvision_mobilenetv3():
    """BatchNorm2d with batchnorm="eval"; Hardswish, squeeze-excite, dropout in the classifier."""
    _check(tv.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25), batchnorm="eval")


def test_torchvision_swin():
    """Shifted-window attention with F.linear(x, qkv.weight, qkv.bias); stochastic depth."""
    _check(tv.models.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=[4, 4], num_classes=CLASSES, stochastic_depth_prob=0.1,
                                     dropout=0.1))
