"Batch augmentation pipelines: per-image randomness, channels, decoding, device and errors."
import pytest
import torch
from fastai.data.core import Pipeline

from self_supervised_swav.augmentations import (BatchNormalize, assert_aug_pipelines, get_batch_augs,
                                                get_multi_aug_pipelines, paper_blur_sigma)


def distinct(batch):
    return len({tuple(b.flatten()[::7].tolist()) for b in batch})


@pytest.mark.parametrize("op", ["crop", "flip", "jitter", "blur"])
def test_each_op_sampled_per_image(op):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).expand(16, -1, -1, -1).contiguous()
    kw = dict(rotate=False, jitter=False, bw=False, blur=False, stats=None, resize_scale=(1.0, 1.0), resize_ratio=(1.0, 1.0), flip_p=0.0)
    if op == "crop": kw.update(resize_scale=(0.2, 0.6), resize_ratio=(3 / 4, 4 / 3))
    if op == "flip": kw.update(flip_p=0.5)
    if op == "jitter": kw.update(jitter=True, jitter_p=1.0)
    if op == "blur": kw.update(blur=True, blur_p=1.0, blur_s=(0.1, 3.0))
    out = get_batch_augs(32, **kw)(x)
    assert distinct(out) > 1 if op == "flip" else distinct(out) == 16


@pytest.mark.parametrize("n_in", [1, 3])
def test_channels_and_range(n_in):
    pipe = get_batch_augs(16, stats=([0.5] * n_in, [0.25] * n_in), jitter_p=1., bw_p=1., blur_p=1.)
    x = torch.rand(8, n_in, 40, 40)
    out = pipe(x)
    assert out.shape == (8, n_in, 16, 16)
    dec = pipe.decode(out)
    assert dec.min() > -1e-4 and dec.max() < 1 + 1e-4


def test_grayscale_rgb_gives_equal_channels():
    out = get_batch_augs(16, rotate=False, jitter=False, blur=False, bw=True, bw_p=1.0, stats=None)(torch.rand(4, 3, 16, 16))
    torch.testing.assert_close(out[:, 0], out[:, 1]); torch.testing.assert_close(out[:, 1], out[:, 2])


def test_paper_blur_scales_with_size():
    assert paper_blur_sigma(96) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))
    kernel = get_batch_augs(96, blur_p=1.0).fs[-2].aug
    assert type(kernel).__name__ == "RandomGaussianBlur"


def test_normalize_errors():
    with pytest.raises(ValueError, match="positive"): BatchNormalize([0.5], [0.0])
    with pytest.raises(ValueError, match="one value per channel"): BatchNormalize([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="stats=None"): get_batch_augs(8)(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("kw,msg", [(dict(size=0), "size"), (dict(size=8.5), "size"), (dict(resize_scale=(0.5, 1.5)), "resize_scale"),
                                    (dict(resize_ratio=(2, 1)), "resize_ratio"), (dict(blur_s=(2, 1)), "blur_s"),
                                    (dict(flip_p=-0.1), "flip_p"), (dict(bw_p=1.1), "bw_p")])
def test_builder_errors(kw, msg):
    args = dict(size=16); args.update(kw)
    with pytest.raises(ValueError, match=msg): get_batch_augs(**args)


def test_input_errors():
    pipe = get_batch_augs(8, stats=None)
    with pytest.raises(TypeError, match="IntToFloatTensor"): pipe(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="batch of images"): pipe(torch.zeros(3, 8, 8))


def test_multi_and_assert():
    pipes = get_multi_aug_pipelines(4, 8)
    assert len(pipes) == 4 and len({id(p) for p in pipes}) == 4
    assert_aug_pipelines(pipes)
    with pytest.raises(ValueError, match="n must"): get_multi_aug_pipelines(0, 8)
    with pytest.raises(ValueError, match="split_idx"): assert_aug_pipelines([Pipeline([], split_idx=1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_gpu():
    pipe = get_batch_augs(32)
    out = pipe(torch.rand(8, 3, 48, 48, device="cuda"))
    assert out.device.type == "cuda" and pipe.decode(out).device.type == "cuda"
