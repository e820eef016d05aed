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


# ---------------------------------------------------------------- what the settings do (not only that they are accepted)
SIDE = 48


def coordinate_images(n: int) -> torch.Tensor:
    "`n` copies of an image whose red channel is the column and green channel the row (each in [0, 1]): a crop's edges tell its box"
    ramp = torch.linspace(0, 1, SIDE)
    img = torch.stack([ramp.view(1, -1).expand(SIDE, -1), ramp.view(-1, 1).expand(-1, SIDE), torch.zeros(SIDE, SIDE)])
    return img.expand(n, -1, -1, -1).contiguous()


def flipped(crops: torch.Tensor) -> torch.Tensor:
    "Which crops of coordinate images are mirrored: their red channel decreases from left to right"
    return crops[:, 0, :, 0].mean(1) > crops[:, 0, :, -1].mean(1)


def swav_pipes(**kw):
    "SwAV-recipe pipelines (2 crops of 24 px, 2 of 12 px) without colour, blur or normalisation, unless `kw` says otherwise"
    from self_supervised_swav.swav import get_swav_aug_pipelines
    return get_swav_aug_pipelines(**(dict(num_crops=[2, 2], crop_sizes=[24, 12], jitter=False, bw=False, blur=False, stats=None) | kw))


@pytest.mark.parametrize("flip_p,expected", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_flip_p_is_the_share_of_mirrored_crops(flip_p, expected):
    "flip_p=0 never flips, flip_p=1 always flips, 0.5 half the time: on every crop of the multi-crop pipelines"
    for crops in swav_pipes(flip_p=flip_p)(coordinate_images(400)):
        assert flipped(crops).float().mean().item() == pytest.approx(expected, abs=0.07)


@pytest.mark.parametrize("mins,maxs", [([0.5, 0.05], [0.9, 0.1]), ([0.14, 0.3], [0.3, 0.6])])
def test_min_and_max_scales_bound_the_crop_areas(mins, maxs):
    "The area of every crop (as a fraction of the image) lies in its size's [min_scales, max_scales] and spreads over it"
    crops = swav_pipes(min_scales=mins, max_scales=maxs, flip_p=0.0)(coordinate_images(500))
    for i, c in enumerate(crops):
        lo, hi = mins[i // 2], maxs[i // 2]
        width = (c[:, 0, :, -1].mean(1) - c[:, 0, :, 0].mean(1)) * (SIDE - 1) + 1
        height = (c[:, 1, -1, :].mean(1) - c[:, 1, 0, :].mean(1)) * (SIDE - 1) + 1
        area = width * height / SIDE ** 2
        assert area.min() > lo - 0.02 and area.max() < hi + 0.02, (i, area.min(), area.max())
        assert area.quantile(0.1) < lo + 0.25 * (hi - lo) and area.quantile(0.9) > hi - 0.25 * (hi - lo)   # the whole range is used


def jitter_levels(jitter_s: float) -> torch.Tensor:
    "Mean level of each crop of a plain gray image after the colour jitter (always applied) of strength `jitter_s`"
    pipes = swav_pipes(jitter=True, jitter_p=1.0, jitter_s=jitter_s, flip_p=0.0)
    return torch.cat([c.mean((1, 2, 3)) for c in pipes(torch.full((300, 3, SIDE, SIDE), 0.5))])


def test_jitter_s_sets_the_strength_of_the_colour_jitter():
    "jitter_s=0 leaves the colours alone; a stronger jitter spreads the crops' levels further"
    torch.testing.assert_close(jitter_levels(0.0), torch.full((1200,), 0.5))
    weak, strong = jitter_levels(0.2).std(), jitter_levels(1.0).std()
    assert weak > 0.01 and strong > 3 * weak


def test_recipe_sets_the_augmentations():
    "recipe='swav' jitters or grays 84 % of the crops and never rotates; 'fastai' changes the colour of 51 % and rotates 30 %"
    torch.manual_seed(0)
    from self_supervised_swav.swav import get_swav_aug_pipelines
    colour = torch.tensor([0.6, 0.4, 0.3]).view(1, 3, 1, 1).expand(1000, -1, SIDE, SIDE).contiguous()
    for recipe, changed, rotated in [("swav", 1 - 0.2 * 0.8, 0.0), ("fastai", 1 - 0.7 * 0.7, 0.3)]:
        crops = get_swav_aug_pipelines(num_crops=[1, 1], crop_sizes=[24, 12], min_scales=[0.5, 0.3], max_scales=[1., 0.5],
                                       recipe=recipe, stats=None)(colour)[0]
        centre = crops[:, :, 12, 12]
        assert (centre - colour[:, :, 0, 0]).abs().amax(1).gt(1e-3).float().mean().item() == pytest.approx(changed, abs=0.05), recipe
        dark_corner = crops[:, :, 0, 0].amax(1) < 0.05                 # a rotation pads the corners with zeros
        assert dark_corner.float().mean().item() == pytest.approx(rotated, abs=0.07), recipe
