"""The decoded image cache (`self_supervised_swav.cache`) in a run: `swav_pretrain --cache` trains on the same batches as
without it, a later run reads the cache without decoding, a changed folder rebuilds it, an interrupted build leaves
nothing, a full disk is one line, and two gloo processes (as torchrun's on one machine) build it once."""
from __future__ import annotations
import os
import time
from pathlib import Path

import numpy as np
import pytest

import self_supervised_swav.cache as cache
from self_supervised_swav.cli import main
from self_supervised_swav.config import PretrainConfig
from self_supervised_swav.pretrain import pretrain
from harness import run_gloo, save_result
from helpers import computed, digits_folder, run_main


@pytest.fixture
def decodes(monkeypatch):
    "The files `cache.decode_resized` decodes in this process (the builds' loaders use no worker processes here)"
    calls, decode = [], cache.decode_resized
    def counting(f, *args):
        calls.append(Path(f).name); return decode(f, *args)
    monkeypatch.setattr(cache, "decode_resized", counting)
    return calls


def _run(folder: Path, out: Path, **kw) -> dict:
    config = PretrainConfig(path=str(folder), size=16, crop_sizes=[16, 8], epochs=1, bs=16, n_protos=8, workers=0, output=str(out), **kw)
    return pretrain(config).as_dict()


def test_cached_run_equals_uncached_and_reuses_the_cache(tmp_path, digits, decodes, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # `cache=True` (bare --cache): the per-user folder
    folder = digits_folder(tmp_path / "imgs", digits, n=40)
    plain = _run(folder, tmp_path / "plain")
    assert decodes == []
    cached = _run(folder, tmp_path / "cached", cache=True)
    assert sorted(decodes) == sorted(p.name for p in folder.rglob("*.png"))   # each image decoded once, for the cache
    for k in ("train_loss", "valid_loss", "knn_top1", "protos_used"):
        assert [e[k] for e in cached["epochs"]] == [e[k] for e in plain["epochs"]], k
    assert cached["knn_top1_pretrained"] == plain["knn_top1_pretrained"]
    assert len(list((tmp_path / "xdg" / "self_supervised_swav").glob("imgs-*-16px-1ch-*.npy"))) == 1   # gray images: auto reads them as one channel
    decodes.clear()
    again = _run(folder, tmp_path / "again", cache=True)   # a later run: no decoding at all
    assert decodes == [] and computed(again["epochs"]) == computed(cached["epochs"])


def test_changed_folder_rebuilds(tmp_path, digits, decodes):
    folder = digits_folder(tmp_path / "imgs", digits, n=20)
    build = lambda: cache.image_cache(folder, sorted(folder.rglob("*.png")), 8, 1, tmp_path / "c", num_workers=0, progress=False)
    first = build(); assert (len(decodes), build()) == (20, first)
    touched = next(folder.rglob("*.png"))
    st = os.stat(touched); os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = build()
    assert len(decodes) == 40 and second != first and list((tmp_path / "c").iterdir()) == [second]   # rebuilt, the old one removed
    (folder / "class_0" / "extra.png").write_bytes(touched.read_bytes())
    assert build() != second and len(decodes) == 61


def test_full_disk_is_one_line(tmp_path, digits, monkeypatch):
    folder = digits_folder(tmp_path / "imgs", digits, n=40)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: type("Usage", (), dict(free=1000))())
    code, err = run_main(main, "--path", folder, "--cache", tmp_path / "cache", "--size", 16, "--crop_sizes", 16, 8, "--output", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert "--cache: the images need 14 kB decoded" in err and "has 1 kB free" in err, err   # 40 x 1 x 16 x 16 bytes (gray: one channel) and a header
    assert not (tmp_path / "run").exists() and list((tmp_path / "cache").iterdir()) == []


def test_interrupted_build_leaves_nothing(tmp_path, digits, monkeypatch):
    folder = digits_folder(tmp_path / "imgs", digits, n=20)
    files, decode = sorted(folder.rglob("*.png")), cache.decode_resized
    def interrupted(f, *args):
        if Path(f) == files[10]: raise KeyboardInterrupt
        return decode(f, *args)
    monkeypatch.setattr(cache, "decode_resized", interrupted)
    with pytest.raises(KeyboardInterrupt): cache.image_cache(folder, files, 8, 1, tmp_path / "c", num_workers=0, progress=False)
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.setattr(cache, "decode_resized", decode)
    f = cache.image_cache(folder, files, 8, 1, tmp_path / "c", num_workers=0, progress=False)
    assert np.load(f).shape == (20, 1, 8, 8)


def _build_in_two(rank, world, out_dir, folder):
    "Both processes ask for the cache; local rank 0 decodes only once rank 1 has started waiting for the file"
    calls, decode, waiting = [], cache.decode_resized, Path(out_dir) / "rank1_waiting"
    def after_rank1(f, *args):
        for _ in range(3000):
            if waiting.exists(): break
            time.sleep(0.01)
        calls.append(f); return decode(f, *args)
    cache.decode_resized = after_rank1
    files = sorted(Path(folder).rglob("*.png"))
    if rank == 1: waiting.touch()
    f = cache.image_cache(folder, files, 8, 1, Path(out_dir) / "cache", num_workers=0, progress=False, poll=0.01)
    save_result(out_dir, rank, file=f, n_decoded=len(calls), images=np.load(f))


def test_two_processes_build_once(tmp_path, digits):
    folder = digits_folder(tmp_path / "imgs", digits, n=20)
    r0, r1 = run_gloo(_build_in_two, tmp_path, str(folder))
    assert (r0["n_decoded"], r1["n_decoded"]) == (20, 0)   # rank 1 waited for the file rank 0 built
    assert r0["file"] == r1["file"] and np.array_equal(r0["images"], r1["images"])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [r0["file"].name]
