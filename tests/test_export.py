"Weights in and out (issue 22): a run's exports loaded by timm alone, torchvision and onnxruntime; --init from the official SwAV layout and plain state_dicts; the original library's encoder files; crafted pickles refused everywhere."
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from helpers import child_env, official_swav_state
from self_supervised_swav.checks import SettingError
from self_supervised_swav.checkpoint import read_checkpoint
from self_supervised_swav.cli import swav_pretrain, UsageError
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.modelfile import (init_swav_model, load_encoder, load_pretrained_encoder, load_swav_model, read_init)
from self_supervised_swav.swav import create_swav_model

TINY = dict(size=16, crop_sizes=[16, 8], epochs=1, max_images=120, bs=40)

TIMM_ONLY = """
import json, sys, timm, torch
folder, arch = sys.argv[1], sys.argv[2]
cfg = json.load(open(folder + "/config.json"))
x = torch.load(folder + "/x.pt")
a = timm.create_model("local-dir:" + folder, pretrained=True, num_classes=7).eval()
b = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=folder + "/model.safetensors"), num_classes=7,
                      in_chans=cfg["model_args"]["in_chans"], global_pool=cfg["model_args"]["global_pool"]).eval()
with torch.no_grad(): out = {k: m.forward_head(m.forward_features(x), pre_logits=True) for k, m in dict(a=a, b=b).items()}
torch.save(dict(out, logits=tuple(a(x).shape), ours=sorted(m for m in sys.modules if m.startswith("self_supervised"))), folder + "/out.pt")
"""


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rgb")
    swav_pretrain(arch="resnet18", rgb=True, n_protos=20, output=str(out), **TINY)
    return out


def test_timm_loads_the_export_without_the_library(rgb_run):
    timm_dir = rgb_run / "timm"
    assert sorted(p.name for p in timm_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    encoder, meta = load_pretrained_encoder(rgb_run / "encoder.pth")
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, timm_dir / "x.pt")
    subprocess.run([sys.executable, "-c", TIMM_ONLY, str(timm_dir), "resnet18"], check=True, cwd=rgb_run, env=child_env(PYTHONPATH=""))
    got = torch.load(timm_dir / "out.pt", weights_only=False)
    with torch.no_grad(): want = encoder.eval()(x)
    assert got["ours"] == [] and got["logits"] == (3, 7)
    torch.testing.assert_close(got["a"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["b"], want, atol=1e-5, rtol=1e-5)
    cfg = json.loads((timm_dir / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == meta["stats"][0] and cfg["pretrained_cfg"]["input_size"] == [3, 16, 16]
    card = (timm_dir / "README.md").read_text()
    results = json.loads((rgb_run / "swav_pretrain.json").read_text())
    assert card.startswith("---\nlibrary_name: timm\n") and f"{results['knn_top1_pretrained']:.4f} pretrained" in card
    assert "| arch | resnet18 |" in card and "120" not in card.split("## Data")[0]


def test_torchvision_loads_the_export(rgb_run):
    encoder, _ = load_pretrained_encoder(rgb_run / "encoder.pth")
    tv = torchvision.models.resnet18().eval()
    res = tv.load_state_dict(torch.load(rgb_run / "encoder_torchvision.pth", weights_only=True), strict=False)
    assert res.missing_keys == ["fc.weight", "fc.bias"] and res.unexpected_keys == []
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(tv(x), encoder.eval()(x)[:, :512], atol=1e-5, rtol=1e-5)   # catavgmax: average first


def test_onnx_export_matches(rgb_run):
    ort = pytest.importorskip("onnxruntime")
    encoder, _ = load_pretrained_encoder(rgb_run / "encoder.pth")
    sess = ort.InferenceSession(str(rgb_run / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for bs in (1, 6):
        x = torch.randn(bs, 3, 16, 16)
        with torch.no_grad(): torch.testing.assert_close(torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), encoder.eval()(x), atol=1e-4, rtol=0)


def test_init_from_the_official_layout_continues_pretraining(tmp_path, capsys):
    state = official_swav_state("resnet18", hidden=64, proj=16, n_protos=20)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    out = tmp_path / "run"
    swav_pretrain(arch="resnet18", rgb=True, n_protos=20, init=str(tmp_path / "swav_800ep_pretrain.pth.tar"), lr=1e-9, output=str(out), **TINY)
    assert "init: official SwAV weights from" in capsys.readouterr().out
    model, meta = load_swav_model(out / "swav_model.pth")
    assert (meta["pool_type"], meta["hidden_size"], meta["projection_size"], meta["n_protos"]) == ("avg", 64, 16, 20)
    torch.testing.assert_close(model.encoder.conv1.weight, state["module.conv1.weight"], atol=1e-5, rtol=0)   # lr 1e-9: the file's weights, barely moved
    torch.testing.assert_close(model.projector[3].weight, state["module.projection_head.3.weight"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.prototypes.weight, nn.functional.normalize(state["module.prototypes.weight"], dim=1), atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match=r"--init '.*' \(official SwAV\): its encoder does not fit this resnet10t: .*missing"):
        swav_pretrain(arch="resnet10t", rgb=True, n_protos=20, init=str(tmp_path / "swav_800ep_pretrain.pth.tar"), output=str(tmp_path / "run3"), **TINY)


def test_init_resnet50_official_layout():
    state = official_swav_state("resnet50", hidden=2048, proj=128, n_protos=3000)
    init = read_init_from(state)
    assert init.head == dict(hidden_size=2048, projection_size=128, nlayers=2, bn=True) and init.pool_type == "avg"
    model = create_swav_model(create_encoder("resnet50", pretrained=False, pool_type=init.pool_type), n_protos=3000, **init.head)
    assert init_swav_model(model, init).endswith("encoder, projection head, 3000 prototypes")
    assert torch.equal(model.encoder.layer4[2].conv3.weight, state["module.layer4.2.conv3.weight"])


def read_init_from(state: dict):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / "w.pth")
        return read_init(Path(d) / "w.pth")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_init_from_a_resnet_state_dict_is_the_encoder_only(source, arch):
    import timm
    sd = getattr(torchvision.models, arch)().state_dict() if source == "torchvision" else timm.create_model(arch, pretrained=False).state_dict()
    init = read_init_from(sd)
    model = create_swav_model(create_encoder(arch, pretrained=False), n_protos=8)
    assert "projector and prototypes start random" in init_swav_model(model, init)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_original_library_files_load(tmp_path):
    from fastai.layers import AdaptiveConcatPool2d, Flatten
    from fastai.vision.learner import create_body
    import fastai.vision.models.xresnet as fx
    x = torch.randn(2, 3, 32, 32)
    for arch, model in (("xresnet18", fx.xresnet18()), ("resnet18", torchvision.models.resnet18())):
        old = nn.Sequential(*create_body(model, n_in=3, pretrained=False), AdaptiveConcatPool2d(), Flatten()).eval()   # self_supervised 1.0.4
        torch.save(old.state_dict(), tmp_path / f"{arch}.pth")
        new = load_encoder(create_encoder(arch, pretrained=False), tmp_path / f"{arch}.pth").eval()
        with torch.no_grad(): torch.testing.assert_close(new(x), old(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"missing: .*unexpected: "):
        load_encoder(create_encoder("resnet10t", pretrained=False), tmp_path / "xresnet18.pth")


class Armed:
    "Unpickling it creates `target`: what a malicious weights file would do"
    def __init__(self, target: Path): self.target = target
    def __reduce__(self): return (Path.touch, (self.target,))


def test_crafted_pickles_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.ones(1), "payload": Armed(marker)}, evil)
    run = tmp_path / "run"; run.mkdir()
    torch.save({"settings": {}, "payload": Armed(marker)}, run / "checkpoint.pth")
    loaders = [lambda: read_init(evil), lambda: load_pretrained_encoder(evil), lambda: load_swav_model(evil),
               lambda: load_encoder(create_encoder("resnet10t", pretrained=False), evil), lambda: read_checkpoint(run / "checkpoint.pth")]
    for load in loaders:
        with pytest.raises((ValueError, SettingError)) as e: load()
        assert "\n" not in str(e.value).strip()
    with pytest.raises(UsageError, match="--init '.*' refused"): swav_pretrain(init=str(evil), output=str(tmp_path / "o1"), **TINY)
    with pytest.raises(UsageError, match="--resume"): swav_pretrain(resume=str(run), **TINY)
    assert not marker.exists()
    torch.load(evil, weights_only=False)   # the file is armed: an unsafe load would have run it
    assert marker.exists()


def test_onnx_refusal_is_one_line_and_quiet(tmp_path, capfd):
    pytest.importorskip("onnx")
    from self_supervised_swav.export import export_onnx

    class FFT(nn.Module):   # an operator the ONNX exporter does not know
        def forward(self, x): return torch.fft.rfft2(x).abs().mean((1, 2, 3))[:, None]
    with pytest.raises(SettingError, match=r"^onnx: fft does not export to ONNX \(UnsupportedOperatorError: .*\): export timm or torchvision$"):
        export_onnx(FFT(), dict(arch="fft", n_in=1, image_size=8), tmp_path / "fft.onnx")
    assert capfd.readouterr().out == "" and not (tmp_path / "fft.onnx").exists()


def test_init_from_this_library_keeps_the_head(tmp_path):
    from self_supervised_swav.modelfile import save_swav_model
    torch.manual_seed(0)
    model = create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=1, pool_type="avg"), hidden_size=32, projection_size=8, n_protos=6)
    save_swav_model(model, tmp_path / "swav_model.pth", arch="resnet10t")
    torch.save(model.state_dict(), tmp_path / "learn_save.pth")   # a learn.save(with_opt=False) file: the model's state_dict
    for f in ("swav_model.pth", "learn_save.pth"):
        init = read_init(tmp_path / f)
        assert init.layout == "swav_model" and init.head == dict(hidden_size=32, projection_size=8, nlayers=2, bn=True)
        fresh = create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=1, pool_type=init.pool_type or "avg"), n_protos=6, **init.head)
        init_swav_model(fresh, init)
        assert all(torch.equal(a, b) for a, b in zip(fresh.projector.state_dict().values(), model.projector.state_dict().values()))
        torch.testing.assert_close(fresh.prototypes.weight, model.prototypes.weight)
