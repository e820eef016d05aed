"Encoder save/load round trips and mismatches, and the frozen/unfrozen parameter groups of finetune_learner."
import pytest
import torch
from torch import nn
from fastai.learner import Learner
import fastai.callback.progress  # Learner.no_bar

from self_supervised_swav.finetune import finetune_learner, load_encoder, save_encoder, state_dict_mismatch
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines


@pytest.fixture(scope="module")
def digits16():
    from self_supervised_swav.data import digits_images
    return digits_images(size=16)


@pytest.fixture
def dls16(digits16):
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits16
    return image_tensor_dls(x[:160], y[:160], valid_pct=0.2, bs=32, device="cpu")


def features(encoder, x):
    encoder.eval()
    with torch.no_grad(): return encoder(x)


def perturb(module, seed=0):
    "Change every parameter and BatchNorm statistic, so that a round trip that forgets any of them shows"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point(): t.add_(0.1 * torch.randn(t.shape, generator=g)).abs_()
    return module


@pytest.mark.parametrize("arch", ["resnet10t", "xresnet18"])
def test_round_trip_gives_identical_features(arch, tmp_path):
    enc = perturb(create_encoder(arch, pretrained=False, n_in=1))
    path = save_encoder(enc, tmp_path / "enc.pth", arch=arch)
    fresh = load_encoder(create_encoder(arch, pretrained=False, n_in=1), path)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(features(fresh, x), features(enc, x))


def test_save_from_learner_and_swav_model(tmp_path, dls16):
    model = create_swav_model(perturb(create_encoder("resnet10t", pretrained=False, n_in=1)), n_protos=10)
    augs = get_swav_aug_pipelines(num_crops=[2, 1], crop_sizes=[16, 8], stats=None)
    learn = Learner(dls16, model, cbs=SWAV(augs, [0, 1], K=None))
    x = torch.randn(2, 1, 16, 16)
    for i, obj in enumerate([learn, model]):
        path = save_encoder(obj, tmp_path / f"{i}.pth")
        assert torch.equal(features(load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), path), x), features(model.encoder, x))
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"encoder", "meta"} and ckpt["meta"]["encoder_class"] == "ResNet"
    assert not any(k.startswith(("projector", "prototypes", "queue")) for k in ckpt["encoder"])


@pytest.mark.parametrize("with_opt", [True, False])
def test_load_from_learn_save_checkpoint(tmp_path, dls16, with_opt):
    model = create_swav_model(perturb(create_encoder("resnet10t", pretrained=False, n_in=1)), n_protos=10)
    learn = Learner(dls16, model, path=tmp_path, model_dir=".")
    learn.create_opt()
    learn.save("ckpt", with_opt=with_opt)
    if with_opt:
        with pytest.raises(ValueError, match="weights_only=False"):
            load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), tmp_path / "ckpt.pth")
    fresh = load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), tmp_path / "ckpt.pth", weights_only=not with_opt)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(features(fresh, x), features(model.encoder, x))


def test_mismatched_architecture_names_the_keys(tmp_path):
    path = save_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), tmp_path / "enc.pth", arch="resnet10t", n_in=1)
    with pytest.raises(ValueError, match=r"resnet10t.*missing.*unexpected") as e:
        load_encoder(create_encoder("resnet18", pretrained=False, n_in=1), path)
    assert "layer1.1" in str(e.value) or "missing" in str(e.value)
    with pytest.raises(ValueError, match=r"conv1\.0\.weight \(24, 1, 3, 3\) in the file vs \(24, 3, 3, 3\)"):
        load_encoder(create_encoder("resnet10t", pretrained=False, n_in=3), path)
    with pytest.raises(ValueError, match="missing"):
        load_encoder(create_encoder("xresnet18", pretrained=False, n_in=1), path)


def test_failed_load_leaves_encoder_untouched(tmp_path):
    path = save_encoder(perturb(create_encoder("resnet10t", pretrained=False, n_in=1)), tmp_path / "enc.pth")
    target = create_encoder("resnet10t", pretrained=False, n_in=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError): load_encoder(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_state_dict_mismatch_is_none_for_same_architecture():
    a, b = create_encoder("resnet10t", pretrained=False), create_encoder("resnet10t", pretrained=False)
    assert state_dict_mismatch(a, b.state_dict()) is None


def test_load_encoder_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="No encoder weights"): load_encoder(nn.Linear(2, 2), tmp_path / "none.pth")
    with pytest.raises(TypeError, match="encoder must be"): load_encoder("resnet10t", tmp_path / "none.pth")
    with pytest.raises(TypeError, match="Learner, a SwAV model or an encoder"): save_encoder("resnet10t", tmp_path / "x.pth")


def test_freeze_trains_only_the_head_and_unfreeze_everything(dls16):
    learn = finetune_learner(dls16, create_encoder("resnet10t", pretrained=False, n_in=1), n_out=10)
    enc, head = learn.model
    assert len(learn.opt.param_groups) == 2
    assert not any(p.requires_grad for p in enc.parameters()) and all(p.requires_grad for p in head.parameters())
    enc_before = {k: v.clone() for k, v in enc.state_dict().items()}
    head_before = [p.detach().clone() for p in head.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(torch.equal(v, enc_before[k]) for k, v in enc.state_dict().items())     # weights and BN statistics
    assert any(not torch.equal(p, q) for p, q in zip(head.parameters(), head_before))
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, base_lr=1e-3, freeze_epochs=0)
    assert all(p.requires_grad for p in learn.model.parameters())
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1]                                                             # discriminative learning rates
    assert not torch.equal(enc.state_dict()["conv1.0.weight"], enc_before["conv1.0.weight"])


def test_train_bn_true_is_fastai_default_behaviour(dls16):
    learn = finetune_learner(dls16, create_encoder("resnet10t", pretrained=False, n_in=1), n_out=10, train_bn=True)
    bn = learn.model[0].conv1[1]
    assert bn.weight.requires_grad and not learn.model[0].conv1[0].weight.requires_grad


def test_head_batchnorm_starts_from_feature_statistics(dls16):
    enc = create_encoder("resnet10t", pretrained=False, n_in=1)
    learn = finetune_learner(dls16, enc, n_out=10)
    assert enc.training                                                                # mode restored
    feats = features(enc, dls16.train.dataset.x)
    torch.testing.assert_close(learn.model[1][0].running_mean, feats.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(learn.model[1][0].running_var, feats.var(0), atol=1e-6, rtol=1e-3)


def test_finetune_learner_bad_arguments(dls16):
    with pytest.raises(ValueError, match="n_out"): finetune_learner(dls16, create_encoder("resnet10t", pretrained=False, n_in=1))
    with pytest.raises(TypeError, match="encoder must be"): finetune_learner(dls16, "resnet10t", n_out=10)
