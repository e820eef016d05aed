"Encoder and SwAV-model save/load round trips, the metadata, bad files, mismatches, and the frozen/unfrozen parameter groups of finetune_learner."
import json
import re
import warnings

import pytest
import torch
from torch import nn
from fastai.learner import Learner
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)

from self_supervised_swav import __version__
from self_supervised_swav.augmentations import BatchNormalize
from self_supervised_swav.checks import SettingError
from self_supervised_swav.finetune import finetune_learner
from self_supervised_swav.modelfile import (ENCODER_META_KEYS, SWAV_META_KEYS, atomic_save, check_meta, load_encoder, load_pretrained_encoder,
                                            load_swav_model, pretrained_meta, save_encoder, save_swav_model, state_dict_mismatch)
from self_supervised_swav.normalization import InputNormalization
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
    assert set(ckpt) == {"format", "encoder", "meta"} and ckpt["meta"]["encoder_class"] == "ResNet"
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
    with pytest.raises(FileNotFoundError, match="encoder='resnet10t' is not a file.*create_encoder"): finetune_learner(dls16, "resnet10t", n_out=10)
    with pytest.raises(TypeError, match="encoder must be"): finetune_learner(dls16, 3, n_out=10)


# ---- files that rebuild themselves: save_swav_model / load_swav_model, save_encoder / load_pretrained_encoder

STATS = ([0.2], [0.3])


@pytest.fixture
def pre_learn(dls16):
    "A pretraining Learner with SWAV (normalising pipelines, temp 0.2) around a perturbed tiny SwAV model"
    model = create_swav_model(perturb(create_encoder("resnet10t", pretrained=False, n_in=1)), hidden_size=32,
                              projection_size=16, n_protos=10)
    augs = get_swav_aug_pipelines(num_crops=[2, 1], crop_sizes=[16, 8], stats=STATS)
    return Learner(dls16, model, cbs=SWAV(augs, [0, 1], K=None, temp=0.2))


def test_meta_has_every_key_and_is_json(pre_learn):
    meta = pretrained_meta(pre_learn)
    assert set(SWAV_META_KEYS) <= set(meta) and json.loads(json.dumps(meta)) == meta
    assert {k: meta[k] for k in ("arch", "arch_kwargs", "n_in", "pool_type", "feature_dim", "image_size", "crop_sizes",
                                 "library_version", "hidden_size", "projection_size", "n_protos", "bn", "nlayers")} == dict(
        arch="resnet10t", arch_kwargs={}, n_in=1, pool_type="catavgmax", feature_dim=1024, image_size=16, crop_sizes=[16, 8],
        library_version=__version__, hidden_size=32, projection_size=16, n_protos=10, bn=True, nlayers=2)
    assert torch.allclose(torch.tensor(meta["stats"]), torch.tensor([[0.2], [0.3]]))
    assert meta["temp"] == 0.2
    enc_meta = pretrained_meta(pre_learn.model.encoder, arch_kwargs={"drop_rate": 0.0}, image_size=20, note="x")
    assert not set(SWAV_META_KEYS[len(ENCODER_META_KEYS):]) & set(enc_meta) and enc_meta["stats"] is None
    assert enc_meta["arch_kwargs"] == {"drop_rate": 0.0} and enc_meta["image_size"] == 20 and enc_meta["note"] == "x"


def test_swav_model_round_trip_same_outputs(pre_learn, tmp_path):
    path = save_swav_model(pre_learn, tmp_path / "swav.pth")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"format", "meta", "model"} and ckpt["meta"]["kind"] == "swav_model"
    assert all(k.startswith(("encoder.", "projector.", "prototypes.")) for k in ckpt["model"])   # no queue, no random states
    model, meta = load_swav_model(path)
    assert meta == {**pretrained_meta(pre_learn), "kind": "swav_model"}
    x = torch.rand(3, 1, 16, 16)
    model.eval(); pre_learn.model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), pre_learn.model(x)): assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["encoder", "swav_model"])
def test_encoder_round_trip_from_either_file(pre_learn, tmp_path, kind):
    save = save_encoder if kind == "encoder" else save_swav_model
    enc, meta = load_pretrained_encoder(save(pre_learn, tmp_path / "f.pth"))
    assert meta["kind"] == kind
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(features(enc, x), features(pre_learn.model.encoder, x))


def test_cli_keyword_convention_still_rebuilds(pre_learn, tmp_path):
    path = save_encoder(pre_learn, tmp_path / "encoder.pth", arch="resnet10t", n_in=1, pool_type="catavgmax")
    enc, meta = load_pretrained_encoder(path)
    assert meta["pool_type"] == "catavgmax" and meta["stats"] is not None and meta["crop_sizes"] == [16, 8]
    assert load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), path) is not None   # old loader reads it too


def test_fastai_encoder_round_trip(tmp_path):
    import fastai.vision.models.xresnet as xr
    from self_supervised_swav.layers import create_fastai_encoder
    enc = perturb(create_fastai_encoder(xr.xresnet18, pretrained=False, n_in=1, pool_type="avg"))
    with pytest.raises(ValueError, match="arch=None"): save_encoder(enc, tmp_path / "x.pth")
    fresh, meta = load_pretrained_encoder(save_encoder(enc, tmp_path / "x.pth", arch=xr.xresnet18))
    assert (meta["arch"], meta["pool_type"], meta["feature_dim"]) == ("xresnet18", "avg", 512)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(features(fresh, x), features(enc, x))


def one_line(e): return "\n" not in str(e.value)


def test_files_that_are_not_ours(pre_learn, tmp_path):
    torch.save(pre_learn.model.encoder.state_dict(), tmp_path / "plain.pth")
    (tmp_path / "notes.txt").write_text("hello, not weights")
    good = save_swav_model(pre_learn, tmp_path / "swav.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    learn = Learner(pre_learn.dls, pre_learn.model, path=tmp_path, model_dir=".")
    learn.create_opt(); learn.save("ckpt", with_opt=True)
    cases = {"plain.pth": "load_encoder(encoder, path)", "notes.txt": "not a torch file", "cut.pth": "truncated",
             "empty.pth": "truncated", "ckpt.pth": "Python objects besides weights"}
    for name, msg in cases.items():
        for load in (load_pretrained_encoder, load_swav_model):
            with pytest.raises(ValueError, match=re.escape(msg)) as e: load(tmp_path / name)
            assert one_line(e) and "not a file from save_encoder or save_swav_model" in str(e.value)
    with pytest.raises(FileNotFoundError, match="No saved encoder"): load_pretrained_encoder(tmp_path / "none.pth")


def test_encoder_file_is_not_a_whole_model(pre_learn, tmp_path):
    with pytest.raises(ValueError, match="holds only an encoder.*load_pretrained_encoder") as e:
        load_swav_model(save_encoder(pre_learn, tmp_path / "enc.pth"))
    assert one_line(e)
    with pytest.raises(TypeError, match="save an encoder alone with save_encoder"): save_swav_model(pre_learn.model.encoder, tmp_path / "x.pth")


def edited(path, tmp_path, **changes):
    "A copy of a saved file with its metadata changed (a value None: the key removed)"
    ckpt = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is None: ckpt["meta"].pop(k)
        else: ckpt["meta"][k] = v
    torch.save(ckpt, tmp_path / "edited.pth")
    return tmp_path / "edited.pth"


def test_metadata_missing_keys_are_named(pre_learn, tmp_path):
    path = save_swav_model(pre_learn, tmp_path / "swav.pth")
    with pytest.raises(ValueError, match=r"lacks \['stats', 'image_size'\]") as e:
        load_pretrained_encoder(edited(path, tmp_path, stats=None, image_size=None))
    assert one_line(e)
    with pytest.raises(ValueError, match=r"lacks \['n_protos', 'temp'\].*save_swav_model"):
        load_swav_model(edited(path, tmp_path, n_protos=None, temp=None))
    load_pretrained_encoder(edited(path, tmp_path, n_protos=None, temp=None))        # the encoder does not need them
    old = tmp_path / "old.pth"   # the format before metadata: encoder weights and a few keyword entries
    torch.save(dict(encoder=pre_learn.model.encoder.state_dict(), meta=dict(arch="resnet10t", n_in=1)), old)
    with pytest.raises(ValueError, match=r"lacks \['arch_kwargs', 'pool_type', 'feature_dim'"): load_pretrained_encoder(old)


def test_metadata_bad_values(pre_learn, tmp_path):
    path = save_encoder(pre_learn, tmp_path / "enc.pth")
    for change, msg in [(dict(n_in=0), "invalid n_in=0"), (dict(pool_type="sum"), "invalid pool_type='sum'"),
                        (dict(library_version="next"), "not a version number"),
                        (dict(arch="resnet_nope"), "cannot rebuild the encoder.*resnet_nope"),
                        (dict(feature_dim=512), "returns 1024 features, its metadata says feature_dim=512"),
                        (dict(n_in=3), "encoder weights.*do not fit.*conv1.0.weight")]:
        with pytest.raises(ValueError, match=msg) as e: load_pretrained_encoder(edited(path, tmp_path, **change))
        assert one_line(e), str(e.value)
    with pytest.raises(ValueError, match="lacks"): save_encoder(pre_learn, tmp_path / "x.pth", meta=dict(arch="resnet10t"))
    with pytest.raises(TypeError, match="meta\\['note'\\].*JSON"): save_encoder(pre_learn, tmp_path / "x.pth", note=object())
    with pytest.raises(ValueError, match="kind must be"): check_meta(pretrained_meta(pre_learn), kind="model")


def test_newer_library_version_warns(pre_learn, tmp_path):
    path = edited(save_encoder(pre_learn, tmp_path / "enc.pth"), tmp_path, library_version="99.0.0")
    with pytest.warns(UserWarning, match="newer than this"): enc, meta = load_pretrained_encoder(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); load_pretrained_encoder(save_encoder(pre_learn, tmp_path / "enc.pth"))


def test_finetune_from_file_applies_the_files_normalisation(pre_learn, dls16, tmp_path):
    path = save_encoder(pre_learn, tmp_path / "enc.pth")
    learn = finetune_learner(dls16, path, n_out=10)
    norm, enc = learn.model[0]
    assert isinstance(norm, InputNormalization) and learn.encoder_meta["stats"] == pretrained_meta(pre_learn)["stats"]
    assert len(learn.opt.param_groups) == 2 and not any(p.requires_grad for p in learn.model[0].parameters())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert learn.recorder.values and all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))
    preds, _ = learn.get_preds(dl=dls16.valid)
    learn.model.eval(); pre_learn.model.eval()
    x = dls16.valid.dataset.x
    with torch.no_grad(): expected = torch.softmax(learn.model[1](pre_learn.model.encoder((x - 0.2) / 0.3)), 1)
    torch.testing.assert_close(preds, expected, atol=1e-5, rtol=1e-4)
    raw = finetune_learner(dls16, path, n_out=10, normalize=False)
    assert not any(isinstance(m, InputNormalization) for m in raw.model.modules())


def test_finetune_from_file_warns_when_dls_already_normalise(pre_learn, dls16, tmp_path):
    path = save_encoder(pre_learn, tmp_path / "enc.pth")
    dls16.train.after_batch.add(BatchNormalize(*STATS))
    with pytest.warns(UserWarning, match="normalise their batches.*normalize=False"):
        finetune_learner(dls16, path, n_out=10, init_head_bn=False)


def test_finetune_from_file_without_stats(tmp_path, dls16):
    path = save_encoder(perturb(create_encoder("resnet10t", pretrained=False, n_in=1)), tmp_path / "enc.pth")
    learn = finetune_learner(dls16, str(path), n_out=10)
    assert learn.encoder_meta["stats"] is None and not isinstance(learn.model[0], nn.Sequential)


@pytest.mark.parametrize("arch,pool", [("resnet10t", "avg"), ("resnet10t", "max"), ("convnext_atto", "avg")])
def test_pool_type_is_read_from_the_encoder(arch, pool, tmp_path):
    enc = create_encoder(arch, pretrained=False, n_in=1, pool_type=pool)
    fresh, meta = load_pretrained_encoder(save_encoder(enc, tmp_path / "e.pth"))
    assert meta["pool_type"] == pool and meta["feature_dim"] == fresh(torch.rand(2, 1, 32, 32)).shape[1]


def test_argument_errors_are_setting_errors(pre_learn, dls16, tmp_path):
    "Each bad argument is a `SettingError` naming it, so that a command can print it as one line for its flag"
    enc = create_encoder("resnet10t", pretrained=False, n_in=1)
    cases = [(lambda: finetune_learner(dls16, enc), "n_out"),
             (lambda: pretrained_meta(pre_learn, stats=([0.5, 0.5], [0.2, 0.2])), "stats"),
             (lambda: pretrained_meta(pre_learn, stats=([0.5], [0.])), "stats"),
             (lambda: check_meta(pretrained_meta(pre_learn), kind="model"), "kind")]
    for call, param in cases:
        with pytest.raises(SettingError) as e: call()
        assert e.value.param == param, (param, str(e.value))


def test_atomic_save_keeps_the_old_file_when_a_save_fails(pre_learn, tmp_path):
    "A save that fails half-way leaves the good file in place and no temporary file: load it as before"
    path = save_encoder(pre_learn, tmp_path / "encoder.pth")
    before = path.read_bytes()
    with pytest.raises(Exception): atomic_save(dict(encoder={}, f=lambda x: x), path)   # torch.save cannot write a lambda
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["encoder.pth"]
    enc, _ = load_pretrained_encoder(path)
    assert torch.equal(enc.state_dict()["conv1.0.weight"], pre_learn.model.encoder.state_dict()["conv1.0.weight"].cpu())
