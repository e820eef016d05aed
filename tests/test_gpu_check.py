"""`bench/gpu_check.py` runs: `--dry-run` (CPU, tiny sizes) in this process through its `main(argv)`, so that the
GPU check cannot rot before a GPU runs it; a part over its cap is killed and reported; the carried wheels are there.

Nothing here needs a GPU or measures speed.
"""
from __future__ import annotations
import importlib
import json
import zipfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"   # importable by name too: pytest's `pythonpath`


def gpu_check(): return importlib.import_module("gpu_check")


def test_dry_run_writes_json_and_markdown(tmp_path, capsys):
    "Every part runs (or says why it is skipped) and both reports are written, in seconds"
    gc = gpu_check()
    threads = torch.get_num_threads()
    try: results = gc.main(["--dry-run", "--out", str(tmp_path)])
    finally: torch.set_num_threads(threads)
    capsys.readouterr()
    assert list(results) == gc.PARTS
    for name, r in results.items():
        assert r["status"] in ("ok", "skipped"), f"{name}: {r['status']} {r['message']}"
    assert results["tests"]["status"] == "skipped" and "test_fp16_with_grad_scaler" in results["tests"]["message"]
    assert {r["contender"] for r in results["step"]["rows"]} >= {"project", "floor"}
    assert all(r["bound_ms"] > 0 and r["project_x_bound"] > 0 for r in results["sinkhorn"]["rows"])
    assert set(results["syncs"]["rows"]["shares"]) >= {"augmentation (MultiCrop.__call__)", "Sinkhorn codes (swav_codes)"}
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] and list(doc["parts"]) == gc.PARTS
    md = (tmp_path / "gpu_check.md").read_text()
    for name in gc.PARTS: assert f"## {name}" in md
    assert "| part | status | seconds | note |" in md and "x bound" in md


def test_fashion_mnist_part_skips_without_data(tmp_path, capsys):
    r = gpu_check().run_here("fashion_mnist", gpu_check().parse_args(["--dry-run", "--fm-root", str(tmp_path)]))
    assert r["status"] == "skipped" and "Fashion-MNIST not found" in r["message"]


def test_part_over_its_cap_is_killed(tmp_path):
    "A part run in its own process (as on the GPU) is killed at its cap and reported; the report is still written"
    gc = gpu_check()
    caps = dict(gc.CAPS)
    try:
        gc.CAPS["env"] = 0.5               # no interpreter imports torch that fast
        results = gc.main(["--parts", "env", "--out", str(tmp_path), "--budget", "100", "--cap-scale", "1"])
    finally: gc.CAPS.update(caps)
    assert results["env"]["status"] == "timeout" and "cap" in results["env"]["message"]
    assert (tmp_path / "gpu_check.md").is_file() and (tmp_path / "gpu_check.log").is_file()


def test_wheels_for_the_device():
    "The wheels the GPU machine installs (it has no registry): one version each, Python 3.12 builds, under 64 MiB with the tree"
    wheels = sorted((BENCH / "wheels").glob("*.whl"))
    names = [w.name.split("-")[0].lower() for w in wheels]
    assert len(names) == len(set(names)), names
    assert {"fastai", "fastcore", "fasttransform", "plum_dispatch", "beartype", "fastprogress", "fastdownload", "kornia",
            "kornia_rs"} <= set(names)
    for w in wheels:
        assert w.name.endswith(("py3-none-any.whl", "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                                "cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl")), w.name
        with zipfile.ZipFile(w) as z: assert any(n.endswith("/METADATA") for n in z.namelist())
    assert sum(w.stat().st_size for w in wheels) < 16 * 2**20
