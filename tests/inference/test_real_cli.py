"""The CLI on the real CT with the real LiteMedSAM weights: segment (subprocess), eval and bench.

`msa segment` runs as a user runs it (its own process and model). eval runs in-process through
msa.cli.main on the engine the CLI builds by default (LiteMedSAM + the shipped adapters, encoder on
the default runtime), built once for this file, on 8 slices of the CT cropped as a user may crop it.
bench times the folder's bare backbone (latency does not depend on the adapters).
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
    assert dice(pred == 7, ref) >= 0.83  # the shipped adapters: measured 0.853 (0.858 with the margin of 3 before)


SPLEEN_CROP = slice(16, 24)  # 8 axial slices of the 30; 1-click Dice on them ~ on all 30 (0.733 vs 0.74)


@pytest.fixture(scope="module")
def spleen_crop(ct_paths, tmp_path_factory) -> str:
    """`msa eval` DATA: slices 16-23 of the CT (cropped with SimpleITK, geometry kept) with the FULL label
    file, which eval resamples onto the crop by world coordinates: 8 encoder passes instead of 30."""
    crop = tmp_path_factory.mktemp("spleen_crop") / "ct_crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ct_paths[0]))[:, :, SPLEEN_CROP], str(crop))
    return f"{crop}:{ct_paths[1]}"


@pytest.fixture(scope="module")
def default_engine():
    """What `msa eval DATA` builds with no model option: msa.cli._engine itself, on the parser's defaults
    (LiteMedSAM, the shipped adapters, the default encoder runtime). Built once for this file."""
    from msa.modeling.build import default_adapters

    args = cli.build_parser().parse_args(["eval", "DATA"])
    engine = cli._engine(args)
    meta = engine.model.adapters_meta
    assert default_adapters("lite_medsam") is not None and meta is not None  # the shipped adapters are in
    assert meta["backbone"] == "lite_medsam" and not meta["three_d"]
    return engine


@pytest.fixture
def default_engine_cli(default_engine, monkeypatch):
    """msa.cli's engine factory -> the file's default engine, for commands run with no model option."""
    seen = []

    def factory(args):
        assert args.backbone == "lite_medsam" and not args.three_d and args.checkpoint is None
        assert args.adapters is None and not args.no_adapters  # the default: the shipped adapters
        assert args.runtime == "auto" and args.precision == "fp32"
        seen.append(args)
        return default_engine

    monkeypatch.setattr(cli, "_engine", factory)
    return seen


def test_eval_click1_spleen_headline(spleen_crop, default_engine_cli, capsys):
    """The headline: one click gives the spleen, which the backbone alone cannot (it needs the adapters)."""
    argv = ["eval", spleen_crop, "--prompt", "click1", "--noc", "--labels", "spleen", "--json"]
    assert cli.main(argv) == 0
    assert len(default_engine_cli) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "click1"
    spleen = summary["per_label"]["spleen"]
    assert spleen["n"] == 8  # every slice of the crop holds >= 10 spleen voxels
    # Measured on these 8 slices: shipped adapters 0.733 (OpenVINO and PyTorch alike; 0.74 over all 30
    # slices); the bare backbone (--no-adapters) 0.025: its one-click mask misses the spleen.
    assert spleen["dice"] >= 0.6
    # NoC on the same click sequence, capped at 20 clicks: shipped adapters noc85 2.0 and noc90 2.0
    # (1 to 3 clicks per slice); the bare backbone 20.0 and 20.0 (never 0.85 within 20 clicks on any slice).
    assert spleen["noc85"] <= 3.5 and spleen["noc90"] <= 5
    assert summary["mean_noc85"] == pytest.approx(spleen["noc85"])


def test_eval_click1_named_spleen_and_liver(spleen_crop, default_engine_cli, capsys):
    """A click that names its structure (--named: the shipped adapters' target prompts) gives the whole organ
    where the plain click gives part of it. Measured on these 8 slices: spleen 0.931 named vs 0.733 plain
    (NoC90 1.1 vs 2.0), liver 0.900 vs 0.759."""
    assert cli.main(["eval", spleen_crop, "--prompt", "click1", "--named", "--noc", "--labels", "spleen,liver",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["named"] == ["liver", "spleen"]
    spleen, liver = summary["per_label"]["spleen"], summary["per_label"]["liver"]
    assert spleen["dice"] >= 0.85 and liver["dice"] >= 0.85
    assert spleen["noc90"] <= 1.5


def test_eval_click1_named_whole_brain_on_an_orientation_never_trained(shared_data, default_engine_cli, capsys):
    """One click inside the brain on sagittal slices (training saw axial and coronal ones): named "brain",
    it gives the brain; plain, a structure-sized part of it. Measured on these 8 slices: 0.794 vs 0.526."""
    brain = (f"{shared_data}/brain_t1/brain_t1.nii.gz:{shared_data}/brain_t1/brain_t1_aseg.nii.gz"
             "::labels=none::whole=brain::axes=i::stride=20")
    scores = {}
    for named in (False, True):
        assert cli.main(["eval", brain, "--prompt", "click1", "--json"] + ["--named"] * named) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["per_label"]["brain"]["n"] == 8
        scores[named] = summary["per_label"]["brain"]["dice"]
    assert scores[True] >= 0.7 and scores[True] >= scores[False] + 0.15, scores


def test_eval_box_spleen_json_and_report(spleen_crop, default_engine_cli, tmp_path, capsys):
    report = tmp_path / "report"
    argv = ["eval", spleen_crop, "--prompt", "box", "--labels", "spleen", "--json", "--report", str(report)]
    assert cli.main(argv) == 0
    assert len(default_engine_cli) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "box" and summary["cases"] == 1
    assert list(summary["per_label"]) == ["spleen"]
    spleen = summary["per_label"]["spleen"]
    assert spleen["n"] == 8  # every slice of the crop holds >= 10 spleen voxels
    assert spleen["dice"] >= 0.88  # measured 0.950 on these 8 slices (the backbone alone: 0.952)
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


def test_eval_text_table(spleen_crop, default_engine_cli, capsys):
    assert cli.main(["eval", spleen_crop, "--labels", "1"]) == 0
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
