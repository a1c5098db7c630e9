"""The CLI on the real CT with the real LiteMedSAM weights: segment (subprocess), eval and bench.

`msa segment` runs as a user runs it (its own process and model). eval and bench run in-process
through msa.cli.main with the engine factory pointed at the folder's shared model, so they reuse
embeddings instead of encoding the CT again.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from msa import cli
from msa.data import sample_ct
from msa.engine import Engine
from msa.metrics import dice

from inference_helpers import SPLEEN


def test_segment_spleen_roi_subprocess(spleen_roi, tmp_path):
    image, labels = sample_ct()
    out = tmp_path / "result" / "out.nii.gz"
    roi = ",".join(map(str, spleen_roi))
    result = subprocess.run(
        [sys.executable, "-m", "msa.cli", "segment", str(image), "-o", str(out), "--roi", roi, "--label", "7"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: label 7" in result.stdout
    assert re.search(r"on (2[6-9]|30) slices", result.stdout), result.stdout  # the ROI spans 30; tips may end early
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.nii.gz"]  # no temporary file left

    written, source = nib.load(str(out)), nib.load(str(image))
    assert written.shape == source.shape == (122, 101, 30)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    pred = np.asarray(written.dataobj)
    assert set(np.unique(pred).tolist()) == {0, 7}
    ref = np.asarray(nib.load(str(labels)).dataobj) == SPLEEN
    assert dice(pred == 7, ref) >= 0.85  # measured 0.964


@pytest.fixture
def shared_engine_cli(real_engine, monkeypatch):
    """msa.cli's engine factory -> the folder's shared engine (same model the CLI builds by default)."""
    seen = []

    def factory(args):
        assert args.backbone == "lite_medsam" and not args.three_d and args.checkpoint is None
        seen.append(args)
        return real_engine

    monkeypatch.setattr(cli, "_engine", factory)
    return seen


def test_eval_box_spleen_json_and_report(ct_paths, shared_engine_cli, tmp_path, capsys):
    report = tmp_path / "report"
    argv = ["eval", f"{ct_paths[0]}:{ct_paths[1]}", "--prompt", "box", "--labels", "spleen", "--json",
            "--report", str(report)]
    assert cli.main(argv) == 0
    assert len(shared_engine_cli) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "box" and summary["cases"] == 1
    assert list(summary["per_label"]) == ["spleen"]
    spleen = summary["per_label"]["spleen"]
    assert spleen["n"] == 30  # every spleen slice has >= 10 voxels here
    assert spleen["dice"] >= 0.85  # the data README measured 0.92 per slice with boxes
    assert summary["mean_dice"] == pytest.approx(spleen["dice"])
    assert 0 < spleen["iou"] < spleen["dice"] <= 1
    assert math.isfinite(spleen["hd95"]) and spleen["hd95"] >= 0

    text = (report / "report.md").read_text()
    assert "| spleen |" in text and "Protocol `box`" in text
    pngs = sorted(report.glob("*.png"))
    assert pngs and [str(p) for p in pngs] == sorted(summary["overlays"])
    with Image.open(pngs[0]) as overlay:
        assert overlay.size == (122 * 3, 101 * 3)  # I x J voxels, 3 pixels each
        assert overlay.mode == "RGB"
        colours = np.asarray(overlay)
    assert (colours == (40, 230, 40)).all(axis=-1).any()  # the reference outline is drawn


def test_eval_text_table(ct_paths, shared_engine_cli, capsys):
    assert cli.main(["eval", f"{ct_paths[0]}:{ct_paths[1]}", "--labels", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Protocol `box`, 1 case(s)")
    assert "| spleen |" in out and "| **mean** |" in out


def test_bench_latency_json(ct_paths, real_engine, monkeypatch, tmp_path, capsys):
    """On 6 slices of the CT, with a fresh engine (bench clears its engine's cache) on the shared model."""
    crop = tmp_path / "crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ct_paths[0]))[:, :, 12:18], str(crop))
    engines = []

    def factory(args):
        engines.append(Engine(real_engine.model))
        return engines[-1]

    monkeypatch.setattr(cli, "_engine", factory)
    assert cli.main(["bench", "latency", str(crop), "--json", "--clicks", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("encode_ms_per_slice", "first_click_ms", "next_click_ms", "reencode_click_ms", "ratio",
                "propagate_ms_per_slice", "peak_rss_mb"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["ratio"] > 1  # a cached click is cheaper than one that runs the encoder again
    assert result["reencode_click_ms"] > result["next_click_ms"]
    assert result["backbone"] == "lite_medsam" and result["image"] == str(crop)
    assert 1 <= result["propagated_slices"] <= 6
    # 4 timed slices + the clicked one + the ROI's remaining slice; the no-cache baseline is a separate engine
    assert engines[0].encoded_slices == 6
