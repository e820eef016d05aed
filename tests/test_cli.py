"swav_pretrain end to end on the embedded digits and on folders, and the one-line errors of both commands for each bad input."
import dataclasses
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from self_supervised_swav.cli import UsageError, cluster_main, main, swav_pretrain
from self_supervised_swav.clustering import ClusterConfig
from self_supervised_swav.config import PretrainConfig
from self_supervised_swav.modelfile import load_encoder, load_pretrained_encoder
from self_supervised_swav.layers import create_encoder
from helpers import computed

TINY = dict(size=16, crop_sizes=[16, 8], epochs=1, n_protos=20)   # a few seconds on 2 CPU cores
SCRIPT = shutil.which("swav_pretrain", path=str(Path(sys.executable).parent))


def make_folder(root: Path, classes=("a", "b"), n=12, sizes=((24, 20), (30, 30)), broken=None) -> Path:
    "Images of mixed modes (RGB, L) and sizes, in one sub-folder per class (or flat with classes=None)"
    g = torch.Generator().manual_seed(0)
    for c in classes or [None]:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            im = Image.fromarray(arr)
            (im.convert("L") if i % 3 == 0 else im).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return swav_pretrain(max_images=240, bs=48, output=str(out), **TINY), out


def test_embedded_default_end_to_end(digits_run):
    res, out = digits_run
    exported = ["timm"] + (["encoder.onnx"] if importlib.util.find_spec("onnx") else [])   # resnet10t: no torchvision export
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pth", "crops.png", "data.png", "encoder.pth", "history.csv", "knn.png", "loss.png", "lr.png",
                                              "prototypes.png", "settings.json", "swav_model.pth", "swav_pretrain.json"] + exported)
    assert all((out / f).stat().st_size > 0 for f in os.listdir(out))
    saved = json.loads((out / "swav_pretrain.json").read_text())
    assert saved["data"] == dict(description="scikit-learn digits (embedded), 10 classes, 16 px", n_train=192, n_valid=48, n_in=1, labelled=True)
    assert saved["settings"]["arch"] == "resnet10t" and saved["settings"]["crop_sizes"] == [16, 8]
    assert 0.1 < saved["knn_top1_random"] <= 1 and 0.1 < saved["knn_top1_pretrained"] <= 1
    assert [e["epoch"] for e in saved["epochs"]] == [0]
    assert {"train_loss", "valid_loss", "knn_top1", "protos_used", "assign_entropy"} <= set(saved["epochs"][0])
    assert saved["freeze_protos_iters"] == 0 and "freeze_protos_iters" in saved["settings"]["auto"]   # auto: at most a fifth of the 4 iterations
    load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), out / "encoder.pth")
    assert res["knn_top1_pretrained"] == saved["knn_top1_pretrained"]


def test_saved_encoder_has_full_size_batchnorm_statistics(digits_run):
    "The saved encoder's BatchNorm statistics are those of the full-size training images, not a mix with the small crops'"
    from self_supervised_swav.data import GRAY_STATS, embedded_dls
    from self_supervised_swav.evaluation import recalibrate_bn
    from self_supervised_swav.augmentations import BatchNormalize
    from fastai.data.core import Pipeline
    _, out = digits_run
    enc = load_encoder(create_encoder("resnet10t", pretrained=False, n_in=1), out / "encoder.pth")
    saved = {k: v.clone() for k, v in enc.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    dls = embedded_dls(16, 48, 0.2, 42, max_images=240)   # the run's data: same size, split and seed
    recalibrate_bn(enc, dls.train, Pipeline([BatchNormalize(*GRAY_STATS)]))
    for k, v in enc.state_dict().items():
        if k in saved: torch.testing.assert_close(v, saved[k], rtol=1e-4, atol=1e-5, msg=k)


def test_labelled_folder_end_to_end(tmp_path):
    root = make_folder(tmp_path / "imgs")
    res = swav_pretrain(path=str(root), bs=8, output=str(tmp_path / "out"), valid_pct=0.25, workers=0, **(TINY | dict(n_protos=8)))
    assert res["data"]["labelled"] and res["data"]["n_in"] == 3 and res["data"]["n_train"] == 18
    assert res["knn_top1_random"] is not None and res["knn_top1_pretrained"] is not None
    _, meta = load_pretrained_encoder(tmp_path / "out" / "encoder.pth")   # rebuilt from what the file records
    if not torch.cuda.is_available():   # images under 64 px on a CPU: resnet10t at half width (auto's arch_kwargs)
        assert meta["arch_kwargs"] == {"channels": [32, 64, 128, 256], "stem_width": 16} and "arch_kwargs" in res["settings"]["auto"]


def test_an_unreadable_file_in_an_epoch_is_skipped_listed_and_counted(tmp_path, capsys):
    "One truncated file of 60 (its header fine, so only decoding finds it): under --max_unreadable 0.05 the run goes on and says so once; under the default 1 % it stops"
    from self_supervised_swav.data import unreadable_files
    root = make_folder(tmp_path / "imgs", classes=None, n=60, sizes=((20, 20),))
    bad = root / "7.png"
    bad.write_bytes(bad.read_bytes()[:60])
    res = swav_pretrain(path=str(root), bs=8, output=str(tmp_path / "out"), workers=1, max_unreadable=0.05, **(TINY | dict(n_protos=4, epochs=2)))
    out = capsys.readouterr().out
    assert len(res["epochs"]) == 2 and list(unreadable_files(tmp_path / "out" / "unreadable.txt")) == [str(bad)]
    assert out.count("unreadable images: 1 skipped in epoch 1 (1 in all, 1.67% of the images") == 1 and "in epoch 2" not in out
    with pytest.raises(UsageError) as e:   # the default limit, 1 %, stops it at the end of its first epoch
        swav_pretrain(path=str(root), bs=8, output=str(tmp_path / "out2"), workers=0, **(TINY | dict(n_protos=4)))
    assert "1 of the 60 images (1.7%) cannot be read, more than --max_unreadable 0.01" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out2" / "checkpoint.pth").exists()


def test_unlabelled_gray_folder_end_to_end(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=None)
    res = swav_pretrain(path=str(root), bs=4, gray=True, output=str(tmp_path / "out"), workers=1, **(TINY | dict(n_protos=4)))   # one worker
    assert not res["data"]["labelled"] and res["data"]["n_in"] == 1
    assert res["knn_top1_random"] is None and res["knn_top1_pretrained"] is None
    assert "knn_top1" not in res["epochs"][0] and res["epochs"][0]["train_loss"] > 0


def bad_inputs(root: Path) -> list:
    "(arguments, message) for each mistake the issue lists, and a few more"
    (root / "empty").mkdir(parents=True)
    make_folder(root / "broken", classes=None, n=3)
    (root / "broken" / "3.jpg").write_bytes(b"this is not a jpeg")
    make_folder(root / "small", classes=None, n=3, sizes=((10, 40),))
    make_folder(root / "truncated", classes=None, n=4, sizes=((40, 40),))
    png = (root / "truncated" / "3.png").read_bytes()
    (root / "truncated" / "3.png").write_bytes(png[:len(png) // 3])
    make_folder(root / "huge", classes=None, n=4, sizes=((40, 40), (40, 40), (40, 40), (300, 200)))   # one image over --max_pixels
    return [
        (["--path", str(root / "missing")], "does not exist"),
        (["--path", str(root / "empty")], "no images in"),
        (["--path", str(root / "broken")], "cannot read image"),
        (["--path", str(root / "truncated"), "--bs", "2", "--n_protos", "2", "--crop_sizes", "16", "8"], "cannot read image"),
        (["--path", str(root / "huge"), "--max_pixels", "10000", "--bs", "2", "--n_protos", "2", "--crop_sizes", "16", "8"],   # 1 of 4: over --max_unreadable
         f"max_pixels: image {str(root / 'huge' / '3.png')!r} is 300x200 px (60000 pixels), over the limit of 10000 pixels: pass --max_pixels 60000"),
        (["--path", str(root / "small"), "--crop_sizes", "24", "12"], "crop size 24 px is larger than the smallest image"),
        (["--size", "20"], "crop size 24 px is larger than the images (--size 20)"),
        (["--max_images", "100", "--bs", "128"], "--bs 128 is larger than the 80 training images"),
        (["--max_images", "100", "--K", "500"], "--K=500 (queue length) is larger than the training set"),
        (["--arch", "resnet1000"], "--arch"),
        (["--crop_sizes", "32"], "one value per crop size"),
        (["--jitter_s", "-1"], "--jitter_s"),
        (["--eps", "0"], "--eps must be a number > 0"),
        (["--workers", "-1"], "--workers"),
    ] + ([] if torch.cuda.is_available() else [(["--fp16"], "--fp16 needs a CUDA GPU"),
                                               (["--bf16", "--crop_sizes", "16", "8"], "--bf16 on CPU: resnet10t gets 1x1 maps")])


def as_kwargs(args: list) -> dict:
    "Command-line arguments as keyword arguments of swav_pretrain"
    kw, key = {}, None
    for a in args:
        if a.startswith("--"): key = a[2:]; kw[key] = []
        else: kw[key].append(a)
    conv = dict(size=int, bs=int, n_protos=int, K=int, max_images=int, workers=int, max_pixels=int, eps=float, jitter_s=float, crop_sizes=lambda v: [int(x) for x in v])
    return {k: True if not v else conv[k](v) if k == "crop_sizes" else conv.get(k, str)(v[0]) for k, v in kw.items()}


def test_bad_inputs_raise_usage_error_from_python(tmp_path):
    for args, msg in bad_inputs(tmp_path / "data"):
        with pytest.raises(UsageError, match=None) as e:
            swav_pretrain(output=str(tmp_path / "out"), epochs=1, **as_kwargs(args))
        assert msg in str(e.value), (args, str(e.value))


@pytest.mark.skipif(SCRIPT is None, reason="the swav_pretrain console script is not installed (pip install -e .)")
def test_bad_inputs_print_one_line_from_the_console_script(tmp_path, monkeypatch, capsys):
    "The installed entry point, run in this process: exit status 2 and a single line on stderr"
    for args, msg in bad_inputs(tmp_path / "data"):
        monkeypatch.setattr(sys, "argv", [SCRIPT, "--output", str(tmp_path / "out"), "--epochs", "1", *args])
        with pytest.raises(SystemExit) as e: runpy.run_path(SCRIPT, run_name="__main__")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (args, err)
        assert err.startswith("swav_pretrain: error: ") and msg in err and "\n" not in err, (args, err)


@pytest.mark.skipif(SCRIPT is None, reason="the swav_pretrain console script is not installed (pip install -e .)")
def test_console_script_in_a_fresh_process(tmp_path):
    "No traceback and no import warnings: only the error line"
    p = subprocess.run([SCRIPT, "--path", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip() == f"swav_pretrain: error: --path {str(tmp_path / 'nope')!r} does not exist"


def test_help_lists_the_options(monkeypatch, capsys):
    if SCRIPT is None: pytest.skip("console script not installed")
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--help"])
    with pytest.raises(SystemExit) as e: runpy.run_path(SCRIPT, run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0
    for opt in ["--path", "--arch", "--num_crops", "--crop_sizes", "--min_scales", "--max_scales", "--epochs", "--bs", "--lr",
                "--n_protos", "--K", "--queue_start_pct", "--eps", "--temp", "--output", "--seed", "--fp16"]:
        assert opt in out


def test_recipe_options_and_config(tmp_path):
    "LARS with the official warm-up + cosine trains; settings.json as --config reruns the same run; config mistakes are one line"
    out = tmp_path / "lars"
    res = swav_pretrain(max_images=160, bs=32, output=str(out), opt="lars", schedule="warmup_cosine", epochs=2, warmup_epochs=1,
                        **{k: v for k, v in TINY.items() if k != "epochs"})
    settings = json.loads((out / "settings.json").read_text())
    assert settings["opt"] == "lars" and settings["lr"] == res["settings"]["lr"] > 0 and "lr" in settings["auto"]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in res["epochs"])
    again = swav_pretrain(config=str(out / "settings.json"), output=str(tmp_path / "again"))
    assert computed(again["epochs"]) == computed(res["epochs"])      # the same run, to the last digit (but for its timings)
    bad = tmp_path / "bad.json"
    for cfg, msg in [({"n_protoss": 3}, "unknown settings ['n_protoss']"), ({"bs": "many"}, "bs must be an int"),
                     ({"gray": 1}, "gray must be true or false")]:
        bad.write_text(json.dumps(cfg))
        with pytest.raises(UsageError, match=msg.replace("[", r"\[").replace("]", r"\]")): swav_pretrain(config=str(bad), output=str(tmp_path / "x"))
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not a readable JSON file"): swav_pretrain(config=str(bad), output=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_any_encoder_at_any_crop_size(tmp_path):
    "A ViT trains on 16/8 px crops (dynamic image size); an encoder that cannot take a crop size fails before training, naming the smallest"
    res = swav_pretrain(arch="vit_tiny_patch16_224", arch_kwargs='{"patch_size": 8}', max_images=64, bs=16, output=str(tmp_path / "vit"),
                        **TINY)
    assert res["settings"]["arch_kwargs"] == '{"patch_size": 8}'
    with pytest.raises(UsageError, match="--crop_sizes: .*smallest crop size it accepts is 32 px"):
        swav_pretrain(arch="convnext_atto", max_images=64, bs=16, output=str(tmp_path / "cnx"), **TINY)
    with pytest.raises(UsageError, match="--arch_kwargs must be a JSON object"): swav_pretrain(arch_kwargs="{drop", output=str(tmp_path / "y"))
    with pytest.raises(UsageError, match="--arch: .*does not take the option"): swav_pretrain(arch_kwargs='{"colour": 1}', output=str(tmp_path / "y"))


def test_pretrained_offline_is_one_line(tmp_path):
    "--pretrained without a network (HF_HUB_OFFLINE: no download, no cache): exit 2 with one line naming --pretrained, no output folder"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([SCRIPT, "--pretrained", "--max_images", "100", "--output", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("swav_pretrain: error: --pretrained: cannot get the pretrained weights of resnet10t") and "drop --pretrained" in last
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- every option of both commands, with a bad value

def bad_pretrain_values(tmp: Path) -> dict:
    "{option: argv with a bad value for it}: for every field of PretrainConfig"
    (tmp / "a_file").write_text("x")
    (tmp / "no_run").mkdir(exist_ok=True)
    gpu = torch.cuda.is_available()
    flag_or = lambda name, bad_when: [f"--{name}"] if bad_when else [f"--{name}=1"]   # a flag that cannot apply, or argparse's refusal
    return dict(
        path=["--path", str(tmp / "missing")], arch=["--arch", "resnet1000"], num_crops=["--num_crops", "1", "2"],
        crop_sizes=["--crop_sizes", "0", "0"], min_scales=["--min_scales", "0.9", "0.9"], max_scales=["--max_scales", "2", "2"],
        size=["--size", "0"], epochs=["--epochs", "0"], bs=["--bs", "1"], lr=["--lr", "-1"], n_protos=["--n_protos", "0"],
        K=["--K", "-1"], queue_start_pct=["--queue_start_pct", "2"], eps=["--eps", "0"], temp=["--temp", "0"],
        freeze_protos_iters=["--freeze_protos_iters", "-1"], opt=["--opt", "adamw"], wd=["--wd", "-1"], momentum=["--momentum", "1.5"],
        schedule=["--schedule", "step"], warmup_epochs=["--warmup_epochs", "6"], final_lr=["--final_lr", "0"], recipe=["--recipe", "simclr"],
        jitter_s=["--jitter_s", "-1"], flip_p=["--flip_p", "2"], blur_p=["--blur_p", "-0.5"], budget=["--budget", "soon"], valid_pct=["--valid_pct", "1"],
        gray=["--gray=1"], rgb=["--rgb=1"], max_images=["--max_images", "0"], workers=["--workers", "-1"], cache=["--cache"],
        output=["--output", str(tmp / "a_file" / "out")],
        seed=["--seed", "-1"], fp16=flag_or("fp16", not gpu),
        bf16=["--bf16=1"] if gpu else ["--bf16", "--crop_sizes", "16", "8"],   # on a CPU, crops giving resnet10t 1x1 maps
        channels_last=["--channels_last=1"],
        pretrained=["--pretrained=1"], tensorboard=flag_or("tensorboard", importlib.util.find_spec("tensorboard") is None),
        wandb=flag_or("wandb", importlib.util.find_spec("wandb") is None), config=["--config", str(tmp / "missing.json")],
        arch_kwargs=["--arch_kwargs", "{drop"], resume=["--resume", str(tmp / "no_run")], overwrite=["--overwrite=1"],
        init=["--init", str(tmp / "missing.pth")],
        epoch_samples=["--epoch_samples", "0"], max_pixels=["--max_pixels", "0"], max_unreadable=["--max_unreadable", "1.5"])


def one_error_line(command, argv: list, capsys) -> str:
    "The command run in this process: exit status 2 and one line on stderr, without a traceback"
    with pytest.raises(SystemExit) as e: command(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, e.value.code, err)
    return err


def test_every_pretrain_option_has_a_one_line_error(tmp_path, capsys):
    bad = bad_pretrain_values(tmp_path)
    assert set(bad) == {f.name for f in dataclasses.fields(PretrainConfig)}   # a new option needs a bad value here
    for name, argv in bad.items():
        err = one_error_line(main, ["--output", str(tmp_path / "out"), "--epochs", "1", *argv] if name != "output" else argv, capsys)
        assert err.startswith("swav_pretrain: error: ") and (f"--{name}" in err or f"--{name.replace('_', '-')}" in err), (name, err)
    assert not (tmp_path / "out").exists()   # every mistake is found before the run's folder is made


def test_momentum_is_one_line(capsys):
    "The issue's example: a value the optimiser would refuse with a traceback is one line, before anything is loaded"
    err = one_error_line(main, ["--momentum", "1.5"], capsys)
    assert err == "swav_pretrain: error: --momentum must be in [0, 1), got 1.5\n"


def test_bf16_is_refused_on_a_cpu_without_bfloat16_instructions(monkeypatch, capsys, tmp_path):
    "Emulated bfloat16 is tens of times slower than float32 (52x measured): one line, before the run's folder is made"
    if torch.cuda.is_available(): pytest.skip("on a GPU --bf16 trains on the GPU")
    import self_supervised_swav.precision as precision
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    err = one_error_line(main, ["--bf16", "--crop_sizes", "24", "20", "--output", str(tmp_path / "out")], capsys)   # crops without 1x1 maps
    assert "--bf16 on CPU: this CPU has no bfloat16 instructions" in err and "train in float32 (no bf16)" in err
    assert not (tmp_path / "out").exists()


def test_every_cluster_option_has_a_one_line_error(tmp_path, capsys):
    from self_supervised_swav.modelfile import save_swav_model
    from self_supervised_swav.layers import create_encoder
    from self_supervised_swav.swav import create_swav_model
    torch.manual_seed(0)
    model = create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=1), hidden_size=32, projection_size=16, n_protos=4).eval()
    m = str(save_swav_model(model, tmp_path / "m.pth", arch="resnet10t", stats=([0.3], [0.3]), image_size=16, temp=0.1) or tmp_path / "m.pth")
    imgs = make_folder(tmp_path / "imgs", classes=None, n=4)
    for f in imgs.iterdir(): Image.open(f).convert("L").save(f)
    (tmp_path / "a_file").write_text("x")
    bad = dict(model=["--model", str(tmp_path / "none.pth")], path=["--path", str(tmp_path / "missing")], balanced=["--balanced=1"],
               eps=["--eps", "0"], output=["--output", str(tmp_path / "a_file" / "out")], link=["--link=1"], size=["--size", "0"],
               convert=["--convert=1"], bs=["--bs", "0"], workers=["--workers", "-1"], device=["--device", "nodevice"],
               rows=["--rows", "0"], cols=["--cols", "0"], feature_map=["--feature_map", "umap"], progress=["--no_progress=1"],
               max_pixels=["--max_pixels", "0"])
    assert set(bad) == {f.name for f in dataclasses.fields(ClusterConfig)}
    flag = dict(progress="no_progress")
    for name, argv in bad.items():
        base = dict(model=m, path=str(imgs), output=str(tmp_path / "out"))
        base.pop(name, None)
        err = one_error_line(cluster_main, [a for k, v in base.items() for a in (f"--{k}", v)] + ["--no_progress"] * (name != "progress") + argv, capsys)
        assert err.startswith("swav_cluster: error: ") and f"--{flag.get(name, name)}" in err, (name, err)
    assert not (tmp_path / "out").exists()
