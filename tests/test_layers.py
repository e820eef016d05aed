"Encoders from timm and fastai, feature widths, heads and the downstream splitter."
import pytest
import torch
from torch import nn
from fastai.vision.models.xresnet import xresnet18, xresnet34

from self_supervised_swav.checks import SettingError
from self_supervised_swav.layers import (PoolingType, create_cls_module, create_encoder, create_fastai_encoder,
                                         create_mlp_module, create_model, create_timm_encoder, encoder_feature_dim,
                                         encoder_head_splitter)


@pytest.mark.parametrize("pool,mult", [(PoolingType.CatAvgMax, 2), (PoolingType.Avg, 1), (PoolingType.Max, 1),
                                       (PoolingType.AvgMax, 1), (PoolingType.Fast, 1)])
@pytest.mark.parametrize("kind", ["timm", "fastai"])
def test_pooling_widths(pool, mult, kind):
    enc = create_encoder("resnet10t" if kind == "timm" else "xresnet18", pretrained=False, n_in=1, pool_type=pool)
    out = enc(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 512 * mult)
    assert encoder_feature_dim(enc) == 512 * mult


def test_fastai_callable_and_name_agree():
    torch.manual_seed(0); a = create_fastai_encoder(xresnet34, pretrained=False, n_in=2)
    torch.manual_seed(0); b = create_encoder("xresnet34", pretrained=False, n_in=2)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    x = torch.randn(2, 2, 32, 32)
    a.eval(); b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_vit_encoder_keeps_its_own_pooling_with_a_warning():
    with pytest.warns(UserWarning, match="pool_type"):
        enc = create_encoder("vit_tiny_patch16_224", pretrained=False)          # catavgmax is not a ViT pooling
    assert encoder_feature_dim(enc) == 192
    assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 192)


def test_feature_dim_probe_finds_a_valid_size():
    "A module without `num_features` that needs at least 128 px is probed at 64, then 128"
    class Needs128(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 5, 3)
        def forward(self, x):
            if x.shape[-1] < 128: raise RuntimeError("input too small")
            return self.conv(x).mean((2, 3))
    m = Needs128().train()
    assert encoder_feature_dim(m) == 5
    assert m.training                                                            # mode restored


def test_timm_width_without_forward(monkeypatch):
    enc = create_timm_encoder("resnet10t", pretrained=False)
    monkeypatch.setattr(enc, "forward", lambda x: (_ for _ in ()).throw(AssertionError("no forward pass expected")))
    assert encoder_feature_dim(enc) == 1024


@pytest.mark.parametrize("name,hint", [("resnet10tt", "resnet10t"), ("xresnet19", "xresnet18"), ("efficientnet_b00", "efficientnet_b0")])
def test_unknown_names_suggest(name, hint):
    with pytest.raises(ValueError, match=hint): create_encoder(name, pretrained=False)


def test_fastai_encoder_needs_the_function():
    with pytest.raises(SettingError, match="architecture function"): create_fastai_encoder(xresnet18(), pretrained=False)


@pytest.mark.parametrize("nlayers,bn", [(1, False), (2, True), (3, False)])
def test_mlp(nlayers, bn):
    m = create_mlp_module(10, 20, 5, bn=bn, nlayers=nlayers)
    assert sum(isinstance(l, nn.Linear) for l in m) == nlayers
    assert sum(isinstance(l, nn.BatchNorm1d) for l in m) == (nlayers - 1 if bn else 0)
    assert m(torch.randn(3, 10)).shape == (3, 5)


def test_cls_module_and_splitter_freeze():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from self_supervised_swav.data import ImageTensorDataset
    model = create_model("resnet10t", 3, pretrained=False, n_in=1, lin_ftrs=[])
    ds = ImageTensorDataset(torch.rand(16, 1, 16, 16), torch.randint(0, 3, (16,)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=8, device="cpu"), model, splitter=encoder_head_splitter)
    learn.freeze()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in model[1].parameters()}
    enc_bn = {id(p) for m in model[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    assert head <= trainable and trainable - head <= enc_bn        # fastai keeps BatchNorm trainable when frozen
    learn.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    assert create_cls_module(8, 2, lin_ftrs=[4, 4])(torch.randn(5, 8)).shape == (5, 2)


# --- options passed through, any crop size, crop-size check -------------------------------------------------------

from self_supervised_swav.layers import check_encoder_input_size, min_input_size


def test_unknown_timm_option_is_named():
    with pytest.raises(SettingError, match=r"resnet10t does not take the option colour='red'"):
        create_encoder("resnet10t", pretrained=False, colour="red")
    with pytest.raises(SettingError, match=r"vit_tiny_patch16_224 does not take the option colour"):
        create_encoder("vit_tiny_patch16_224", pretrained=False, pool_type="avg", colour="red")   # dynamic_img_size is taken


def test_unknown_fastai_option_is_named():
    with pytest.raises(SettingError, match=r"xresnet18 does not take the option colour='red'"):
        create_encoder("xresnet18", pretrained=False, colour="red")


@pytest.mark.parametrize("arch,kwargs,fix", [("resnet10t", dict(in_chans=1), "use n_in"), ("resnet10t", dict(global_pool="avg"), "use pool_type"),
                                             ("resnet10t", dict(num_classes=5), "no classifier"), ("xresnet18", dict(c_in=1), "use n_in"),
                                             ("xresnet18", dict(n_out=5), "no head")])
def test_options_create_encoder_sets_are_refused(arch, kwargs, fix):
    with pytest.raises(SettingError, match=fix): create_encoder(arch, pretrained=False, **kwargs)


def test_timm_options_reach_the_model():
    enc = create_encoder("resnet10t", pretrained=False, n_in=1, drop_rate=0.3)
    assert enc.drop_rate == 0.3


def test_fastai_options_reach_the_architecture():
    enc = create_encoder("xresnet18", pretrained=False, n_in=1, act_cls=nn.SiLU)
    assert any(isinstance(m, nn.SiLU) for m in enc.modules())
    assert enc(torch.randn(2, 1, 16, 16)).shape == (2, 1024)


@pytest.mark.parametrize("size", [64, 32])
def test_vit_takes_multi_crop_sizes(size):
    enc = create_encoder("vit_tiny_patch16_224", pretrained=False, pool_type="avg")
    assert enc.dynamic_img_size is True
    assert enc(torch.randn(2, 3, size, size)).shape == (2, 192)
    check_encoder_input_size(enc, [size], 3)


def test_dynamic_img_size_given_by_the_user_wins():
    enc = create_encoder("vit_tiny_patch16_224", pretrained=False, pool_type="avg", dynamic_img_size=False)
    assert enc.dynamic_img_size is False
    with pytest.raises(ValueError, match="built for 224 px images only; build it with dynamic_img_size=True"):
        check_encoder_input_size(enc, [224, 64], 3)


def test_cnn_does_not_get_dynamic_img_size():
    assert not hasattr(create_encoder("resnet10t", pretrained=False), "dynamic_img_size")


def test_convnext_small_crop_names_the_smallest_size():
    enc = create_encoder("convnext_atto", pretrained=False, pool_type="avg")
    check_encoder_input_size(enc, [32], 3)
    with pytest.raises(ValueError) as e: check_encoder_input_size(enc, [32, 16, 8], 3)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("encoder convnext_atto cannot take 16, 8 px crops (RuntimeError: ")
    assert msg.endswith("the smallest crop size it accepts is 32 px; pass crop sizes >= 32")


def test_vit_below_its_patch_size():
    enc = create_encoder("vit_tiny_patch16_224", pretrained=False, pool_type="avg")
    with pytest.raises(ValueError, match="cannot take 8 px crops .*smallest crop size it accepts is 16 px"):
        check_encoder_input_size(enc, [64, 8], 3)
    with pytest.raises(ValueError, match="multiples of its patch size 16 px"): check_encoder_input_size(enc, 40, 3)


@pytest.mark.parametrize("arch", ["resnet10t", "xresnet18"])
def test_resnet_at_sizes_it_takes(arch):
    enc = create_encoder(arch, pretrained=False, n_in=1)
    check_encoder_input_size(enc, [32, 16, 32], 1)           # repeated sizes are run once
    check_encoder_input_size(enc, [24])                      # channels read from the first convolution
    assert min_input_size(enc, 1) == 1


def test_check_restores_modes_and_leaves_statistics():
    enc = create_encoder("resnet10t", pretrained=False, n_in=1).train()
    enc.layer1.eval()
    stats = {k: v.clone() for k, v in enc.state_dict().items()}
    check_encoder_input_size(enc, [16], 1)
    assert enc.training and not enc.layer1.training and enc.layer2.training
    assert all(torch.equal(stats[k], v) for k, v in enc.state_dict().items())
    assert all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize("sizes", [[32, 0], [32, 16.0], [True], ["32"]])
def test_check_bad_sizes(sizes):
    enc = create_encoder("resnet10t", pretrained=False, n_in=1)
    with pytest.raises(SettingError, match="sizes must be positive integers"): check_encoder_input_size(enc, sizes, 1)


def test_custom_name_in_message():
    class Needs32(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(2, 4, 3)
        def forward(self, x):
            if x.shape[-1] < 32: raise RuntimeError("input too small\nsecond line")
            return self.conv(x).mean((2, 3))
    with pytest.raises(ValueError, match=r"^encoder mine cannot take 8 px crops \(RuntimeError: input too small\): .* >= 32$"):
        check_encoder_input_size(Needs32(), [8], name="mine")


@pytest.mark.parametrize("arch,kwargs", [("vit_tiny_patch16_224", {"drop_path_rate": 0.1}), ("xresnet18", {"sa": True}),
                                         ("resnet10t", {})])
def test_rebuild_from_metadata(arch, kwargs):
    import json
    meta = json.loads(json.dumps(dict(arch=arch, n_in=1, pool_type=PoolingType.Avg, arch_kwargs=kwargs)))
    torch.manual_seed(0); a = create_encoder(arch, pretrained=False, n_in=1, pool_type="avg", **kwargs)
    b = create_encoder(meta["arch"], pretrained=False, n_in=meta["n_in"], pool_type=meta["pool_type"], **meta["arch_kwargs"])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_create_model_passes_arch_kwargs():
    model = create_model("resnet10t", 2, pretrained=False, n_in=1, arch_kwargs=dict(drop_rate=0.2), lin_ftrs=[])
    assert model[0].drop_rate == 0.2
