"Encoders from timm and fastai, feature widths, heads and the downstream splitter."
import pytest
import torch
from torch import nn
from fastai.vision.models.xresnet import xresnet18, xresnet34

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
    with pytest.raises(TypeError, match="architecture function"): create_fastai_encoder(xresnet18(), pretrained=False)


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
