"Zero-flag runs on folders: what each `auto` rule does to the run (channels, image size, crops, a given setting winning)."
import json
from pathlib import Path

import torch
from PIL import Image

from helpers import run_main
from self_supervised_swav.cli import main
from self_supervised_swav.modelfile import load_pretrained_encoder


def image_folder(root: Path, mode: str, sizes=((20, 26), (22, 22), (40, 21)), n: int = 12) -> Path:
    "`n` random images of `mode` per class, in two class sub-folders, of mixed sizes"
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).convert(mode).save(root / c / f"{i}.png")
    return root


def run(tmp_path: Path, folder: Path, *flags) -> tuple[dict, str]:
    out = tmp_path / "out"
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf): code, err = run_main(main, "--path", folder, "--output", out, "--epochs", "1", *flags)
    assert code == 0, err
    return json.loads((out / "swav_pretrain.json").read_text()), out


def test_gray_small_images_one_channel_not_upscaled(tmp_path):
    res, out = run(tmp_path, image_folder(tmp_path / "gray", "L"))
    s = res["settings"]
    assert res["data"]["n_in"] == 1 and s["gray"] and "single-channel" in s["auto"]["gray"]
    encoder, meta = load_pretrained_encoder(out / "encoder.pth")
    assert meta["n_in"] == 1 and meta["image_size"] == 21                      # the typical short side: never upscaled
    assert s["size"] == 21 and s["crop_sizes"] == [21, 10] and s["blur_p"] == 0 and s["jitter_s"] == 0.8
    assert s["bs"] == 4 and s["workers"] >= 1                                  # a quarter of the 20 training images, a power of two
    assert s["given"] == ["epochs"]


def test_colour_folder_rgb_and_a_given_setting_wins(tmp_path):
    res, out = run(tmp_path, image_folder(tmp_path / "rgb", "RGB"), "--flip_p", "0.25", "--bs", "8")
    s = res["settings"]
    assert res["data"]["n_in"] == 3 and not s["gray"] and s["jitter_s"] == 1.0
    assert s["flip_p"] == 0.25 and s["bs"] == 8 and "flip_p" not in s["auto"] and {"flip_p", "bs"} <= set(s["given"])
    assert load_pretrained_encoder(out / "encoder.pth")[1]["n_in"] == 3


def test_gray_folder_as_rgb_when_asked(tmp_path):
    res, _ = run(tmp_path, image_folder(tmp_path / "gray", "L", n=6), "--rgb")
    assert res["data"]["n_in"] == 3 and res["settings"]["jitter_s"] == 1.0 and "gray" not in res["settings"]["auto"]
