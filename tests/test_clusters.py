"Prototype assignments (plain, balanced, chunked), cluster statistics, the gallery, and swav_cluster end to end with its one-line errors."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

import self_supervised_swav.clustering as clustering
import self_supervised_swav.modelfile as modelfile
from self_supervised_swav.clusters import (assign_prototypes, balanced_assign, cluster_stats, nearest_images,
                                           prototype_assignments, show_feature_map, show_prototypes)
from self_supervised_swav.clustering import swav_cluster
from self_supervised_swav.cli import cluster_main as main
from self_supervised_swav.checks import SettingError
from self_supervised_swav.swav import SwAVModel, sinkhorn_knopp
from helpers import digits_folder, resnet_swav_model

SIZE, N_PROTOS = 16, 6


@pytest.fixture(scope="module")
def model(): return resnet_swav_model()


@pytest.fixture
def x16(digits_at): return digits_at(SIZE)[0][:80]


def random_embeddings(n=300, d=8, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(k, d, generator=g), dim=1)


# ---------------------------------------------------------------- assignments

def test_plain_assignments_are_the_argmax_of_the_scores(model, x16):
    with torch.no_grad(): _, scores = model(x16)
    res = assign_prototypes(model, x16, bs=32, return_codes=True)
    assert torch.equal(res.prototypes, scores.argmax(1))
    torch.testing.assert_close(res.confidence, (scores / 0.1).softmax(1).amax(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.codes, (scores / 0.1).softmax(1), atol=1e-5, rtol=1e-4)
    assert not model.training


@pytest.mark.parametrize("n_sinkh_iter", [1, 3, 10])
def test_balanced_matches_one_sinkhorn_call(n_sinkh_iter):
    z, w = random_embeddings()
    p, c, q = balanced_assign(z, w, n_sinkh_iter=n_sinkh_iter, chunk_size=len(z), return_codes=True)
    ref = sinkhorn_knopp(z @ w.T, n_sinkh_iter=n_sinkh_iter)
    torch.testing.assert_close(q, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(p, ref.argmax(1))
    torch.testing.assert_close(c, ref.amax(1))


def test_balanced_assignments_are_near_equal_size():
    z, w = random_embeddings(n=500, k=5)
    z = F.normalize(z + 1.5 * w[0], dim=1)        # images bunched up near prototype 0: the plain argmax is very uneven
    plain = (z @ w.T).argmax(1).bincount(minlength=5)
    bal = balanced_assign(z, w)[0].bincount(minlength=5)
    assert plain.max() > 2 * 100, plain
    assert bal.min() >= 0.9 * 100 and bal.max() <= 1.1 * 100, bal


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_balanced_equals_one_call(chunk_size):
    z, w = random_embeddings(n=150)
    one = balanced_assign(z, w, chunk_size=150, return_codes=True)
    chunked = balanced_assign(z, w, chunk_size=chunk_size, return_codes=True)
    assert torch.equal(chunked[0], one[0])
    torch.testing.assert_close(chunked[2], one[2], atol=1e-6, rtol=1e-5)
    res = prototype_assignments(z, w, balanced=True, chunk_size=chunk_size)
    assert torch.equal(res.prototypes, one[0]) and res.balanced


def test_balanced_from_a_model_equals_sinkhorn_of_its_scores(model, x16):
    with torch.no_grad(): _, scores = model(x16)
    res = assign_prototypes(model, x16, balanced=True, chunk_size=16, return_codes=True)
    torch.testing.assert_close(res.codes, sinkhorn_knopp(scores, n_sinkh_iter=20), atol=1e-5, rtol=1e-4)


def test_assignment_errors_name_the_parameter(model, x16):
    z, w = random_embeddings()
    with pytest.raises(SettingError, match="chunk_size"): balanced_assign(z, w, chunk_size=0)
    with pytest.raises(SettingError, match="empty"): balanced_assign(z[:0], w)
    with pytest.raises(SettingError, match="prototype_weights"): prototype_assignments(z, w[:, :3])
    with pytest.raises(SettingError, match="temp"): prototype_assignments(z, w, temp=0)
    with pytest.raises(TypeError, match="SwAV model"): assign_prototypes(torch.nn.Linear(2, 2), x16)


# ---------------------------------------------------------------- statistics

def test_metrics_equal_scikit_learn_on_a_fixed_example():
    a = np.array([0, 0, 1, 1, 1, 2, 2, 0, 3, 3])
    y = np.array([1, 1, 2, 2, 1, 0, 0, 0, 2, 2])
    st = cluster_stats(torch.tensor(a), 5, labels=torch.tensor(y))
    assert st.nmi == pytest.approx(normalized_mutual_info_score(y, a))
    assert st.ari == pytest.approx(adjusted_rand_score(y, a))
    assert st.purity == pytest.approx(contingency_matrix(y, a).max(0).sum() / len(a)) == pytest.approx(0.8)
    assert st.sizes == [3, 3, 2, 2, 0] and st.n_empty == 1 and st.n_dominant == 0
    assert st.confusion.tolist() == [[1, 2, 0], [0, 1, 2], [2, 0, 0], [0, 0, 2], [0, 0, 0]]
    json.dumps(st.as_dict())


def test_perfect_clustering_nmi_1_shuffled_about_0():
    y = np.repeat(np.arange(10), 50)
    perfect = cluster_stats((y * 7) % 10, 10, labels=y)
    assert perfect.nmi == pytest.approx(1.0) and perfect.ari == pytest.approx(1.0) and perfect.purity == 1.0
    shuffled = cluster_stats(np.random.default_rng(0).permutation(y), 10, labels=y)
    assert abs(shuffled.nmi) < 0.05 and abs(shuffled.ari) < 0.01


def test_dominant_empty_and_duplicate_prototypes():
    w = torch.eye(4, 3); w[3] = torch.tensor([1.0, 0.05, 0.0])     # cos(0, 3) = 0.9988
    st = cluster_stats([0] * 17 + [1] * 2 + [2], 4, prototype_weights=w)
    assert st.n_dominant == 1 and st.n_empty == 1
    assert [(i, j) for i, j, _ in st.near_duplicates] == [(0, 3)]
    with pytest.raises(SettingError, match="one label per image"): cluster_stats([0, 1], 4, labels=[0])
    with pytest.raises(SettingError, match=r"\[0, 4\)"): cluster_stats([0, 4], 4)


# ---------------------------------------------------------------- figures

def test_gallery_has_one_row_per_prototype(model, x16):
    res = assign_prototypes(model, x16)
    fig = show_prototypes(res, x16, n_rows=3, n_images=5)
    assert len(fig.axes) == 15
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert all(t.startswith("prototype ") for t in titles[::5]) and not any(titles[i] for i in range(15) if i % 5)
    largest = res.sizes.argsort(descending=True, stable=True)[:3].tolist()
    assert [int(t.split()[1][:-1]) for t in titles[::5]] == largest
    fig = show_prototypes(res, x16, protos=[4, 1], n_images=2)
    assert len(fig.axes) == 4 and fig.axes[2].get_title(loc="left").startswith("prototype 1:")
    plt.close("all")


def test_map_and_nearest_images(model, x16):
    res = assign_prototypes(model, x16)
    fig = show_feature_map(res.embeddings, res.prototypes, max_points=50)
    assert len(fig.axes[0].collections[0].get_offsets()) == 50
    nb = nearest_images(3, res.embeddings, x16, k=4)
    assert len(nb.figure.axes) == 5 and 3 not in nb.indices.tolist()
    plt.close("all")


# ---------------------------------------------------------------- swav_cluster

def save_model(path: Path, model, **meta):
    "A full-model file as swav_pretrain writes it (`save_swav_model`), read back by `load_swav_model`"
    return modelfile.save_swav_model(model, path, **dict(arch="resnet10t", stats=([0.3], [0.3]), image_size=SIZE, temp=0.1, **meta))


def load_returns(monkeypatch, model, meta):
    "Make swav_cluster's `load_swav_model` return (model, meta), for models no file describes"
    monkeypatch.setattr(clustering, "load_swav_model", lambda path: (model, meta))


def run(argv, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("swav_cluster: error: "), err
    return err


def test_swav_cluster_end_to_end(tmp_path, model, digits_at, capsys):
    folder = digits_folder(tmp_path / "imgs", digits_at(24))
    out = tmp_path / "out"
    main(["--model", str(save_model(tmp_path / "swav_model.pth", model)), "--path", str(folder), "--output", str(out),
          "--balanced", "--link", "--rows", "3", "--cols", "4", "--no_progress"])
    printed = capsys.readouterr().out
    assert "20 images in" in printed and "NMI" in printed
    for name in ("clusters.csv", "prototypes.png", "map.png", "summary.json"): assert (out / name).stat().st_size > 0
    rows = (out / "clusters.csv").read_text().splitlines()
    assert rows[0] == "file,prototype,confidence" and len(rows) == 21
    assert rows[1].startswith("class_0/") and 0 <= int(rows[1].split(",")[1]) < N_PROTOS
    s = json.loads((out / "summary.json").read_text())
    assert s["n_images"] == 20 and s["balanced"] and s["labelled"]
    assert sum(s["sizes"]) == 20 and len(s["sizes"]) == N_PROTOS
    assert all(s[k] is not None for k in ("nmi", "ari", "purity")) and s["classes"] == ["class_0", "class_1"]
    links = sorted((out / "by_prototype").rglob("*.png"))
    assert len(links) == 20 and all(l.is_symlink() and l.resolve().is_file() for l in links)
    assert sum(s["sizes"][int(p.name.split("_")[1])] for p in (out / "by_prototype").iterdir()) == 20


def test_an_unreadable_image_stops_the_clustering(tmp_path, model, digits_at, capsys):
    "The one policy of `data`, shared with swav_pretrain: one line naming the file, exit status 2, no output"
    folder = digits_folder(tmp_path / "imgs", digits_at(24), n=4)
    (folder / "class_0" / "broken.png").write_bytes(b"not a png")
    err = run(["--model", str(save_model(tmp_path / "m.pth", model)), "--path", str(folder), "--output", str(tmp_path / "o"), "--no_progress"], capsys)
    assert err.startswith(f"swav_cluster: error: --path: cannot read image {str(folder / 'class_0' / 'broken.png')!r}"), err
    assert not (tmp_path / "o").exists()


def csv_prototypes(out: Path) -> list[int]:
    return [int(r.split(",")[1]) for r in (out / "clusters.csv").read_text().splitlines()[1:]]


def test_cluster_options_have_their_effect(tmp_path, model, digits_at):
    "--balanced, --eps, --link and --feature_map each change what is written (an option parsed and ignored fails here)"
    folder = digits_folder(tmp_path / "imgs", digits_at(24), n=40)
    m = str(save_model(tmp_path / "m.pth", model))
    run_ = lambda name, *args: (main(["--model", m, "--path", str(folder), "--output", str(tmp_path / name), "--no_progress", *args]), tmp_path / name)[1]
    plain, balanced, sharp = run_("plain"), run_("balanced", "--balanced"), run_("sharp", "--balanced", "--eps", "0.002")
    sizes = {k: torch.tensor(csv_prototypes(o)).bincount(minlength=N_PROTOS) for k, o in dict(plain=plain, balanced=balanced, sharp=sharp).items()}
    assert sizes["balanced"].max() < sizes["plain"].max(), sizes              # balanced spreads the images over the prototypes
    assert sizes["sharp"].max() - sizes["sharp"].min() < sizes["balanced"].max() - sizes["balanced"].min(), sizes   # a smaller eps: closer to equal
    assert (sizes["sharp"] > 0).all(), sizes                                   # every prototype used
    assert not (plain / "by_prototype").exists() and (run_("linked", "--link") / "by_prototype").is_dir()
    tsne = run_("tsne", "--feature_map", "tsne")
    assert (tsne / "map.png").read_bytes() != (plain / "map.png").read_bytes()
    assert (run_("tsne_old", "--map", "tsne") / "map.png").stat().st_size > 0   # the older spelling of the flag


def test_swav_cluster_unlabelled_flat_folder(tmp_path, model, digits_at):
    folder = digits_folder(tmp_path / "imgs", digits_at(24), n=6)
    for f in list(folder.rglob("*.png")): f.rename(folder / f.name)
    s = swav_cluster(str(save_model(tmp_path / "m.pth", model)), str(folder), output=str(tmp_path / "o"), progress=False)
    assert not s["labelled"] and s["nmi"] is None and s["n_images"] == 6


def test_swav_cluster_bad_inputs(tmp_path, model, digits_at, monkeypatch, capsys):
    folder = digits_folder(tmp_path / "imgs", digits_at(24), n=4)
    good = str(save_model(tmp_path / "m.pth", model))
    common = ["--output", str(tmp_path / "o"), "--no_progress"]
    (tmp_path / "text.pth").write_text("hello")
    assert "is not a SwAV model file" in run(["--model", str(tmp_path / "text.pth"), "--path", str(folder)] + common, capsys)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pth")
    assert "is not a SwAV model file" in run(["--model", str(tmp_path / "weights.pth"), "--path", str(folder)] + common, capsys)
    assert "does not exist" in run(["--model", str(tmp_path / "none.pth"), "--path", str(folder)] + common, capsys)
    assert "--eps must be a number > 0" in run(["--model", good, "--path", str(folder), "--balanced", "--eps", "0"] + common, capsys)
    modelfile.save_encoder(model, tmp_path / "encoder.pth", arch="resnet10t", image_size=SIZE)
    assert "is not a SwAV model file" in run(["--model", str(tmp_path / "encoder.pth"), "--path", str(folder)] + common, capsys)
    (tmp_path / "empty").mkdir()
    assert "no images in" in run(["--model", good, "--path", str(tmp_path / "empty")] + common, capsys)
    assert "does not exist" in run(["--model", good, "--path", str(tmp_path / "nowhere")] + common, capsys)
    broken = tmp_path / "broken"; broken.mkdir(); (broken / "a.png").write_bytes(b"garbage")
    assert "cannot read image" in run(["--model", good, "--path", str(broken)] + common, capsys)
    colour = digits_folder(tmp_path / "colour", digits_at(24), n=4, rgb=True)
    assert "--convert" in run(["--model", good, "--path", str(colour)] + common, capsys)
    assert swav_cluster(good, str(colour), convert=True, output=str(tmp_path / "o2"), progress=False)["n_images"] == 4
    # a model that takes only one image size: an encoder of fixed-size input
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * SIZE * SIZE, 32))
    fixed = SwAVModel(enc, torch.nn.Linear(32, 16), torch.nn.Linear(16, N_PROTOS, bias=False)).eval()
    load_returns(monkeypatch, fixed, dict(n_in=1, image_size=SIZE, stats=None))
    assert "cannot take 1-channel 24x24 px" in run(["--model", good, "--path", str(folder), "--size", "24"] + common, capsys)
    load_returns(monkeypatch, fixed, dict(n_in=3, image_size=SIZE, stats=None))
    assert "cannot take 3-channel" in run(["--model", good, "--path", str(folder)] + common, capsys)
    load_returns(monkeypatch, fixed, dict(n_in=4, image_size=SIZE))
    assert "4-channel" in run(["--model", good, "--path", str(folder)] + common, capsys)
    load_returns(monkeypatch, torch.nn.Linear(2, 2), {})
    assert "without prototypes" in run(["--model", good, "--path", str(folder)] + common, capsys)
    assert not (tmp_path / "o").exists()
