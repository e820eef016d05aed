"""Decoding real photographs (`data.decode_image`): JPEG draft mode stays within the tolerance the notebook states
(nbs/05_data.ipynb checks it on synthetic JPEGs, and EXIF orientation and the pixel limit). Skipped without the
wallpapers package (`photographs` fixture)."""
import numpy as np
import pytest
from PIL import Image

from self_supervised_swav.data import decode_image


def full_decode(f, size: int, mode: str):
    with Image.open(f) as im: return im.convert(mode).resize((size, size), Image.BILINEAR)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_draft_decode_of_photographs_is_close_to_a_full_decode(photographs, mode):
    "Mean absolute difference (grey levels of 255) of the worst photograph below 1.5, 3 and 8 at 224, 96 and 24 px; no pixel off by more than 80"
    by_size = {Image.open(f).size: f for f in photographs}   # one photograph per size: 400x225 to 5120x2880 px
    for f in by_size.values():
        for size, tol in ((224, 1.5), (96, 3), (24, 8)):
            d = np.abs(np.asarray(decode_image(f, size, mode), np.float32) - np.asarray(full_decode(f, size, mode), np.float32))
            assert d.mean() < tol and d.max() <= 80, (f, size, mode, d.mean(), d.max())
