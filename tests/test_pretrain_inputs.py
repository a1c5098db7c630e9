"""What `msa pretrain` reads from the paths it is given (issue 14, item 15): a DICOM series whose
files have no extension (as PACS exports name them) is used exactly like one named *.dcm, whether
named directly or as a subfolder of a folder of images. Real files: the DICOM series of the shared
data folder and the sample CT shipped with msa; a tiny random vit_tiny and 1 step of pretraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msa.cli
import pytest
from msa.data import sample_ct
from msa.io import is_dicom_file, is_dicom_folder, list_images


@pytest.fixture(scope="module")
def series(data_dir: Path) -> Path:
    folder = data_dir / "ct_abdomen_dicom"
    assert folder.is_dir() and any(p.suffix == ".dcm" for p in folder.iterdir()), f"no DICOM series in {folder}"
    return folder


@pytest.fixture
def stripped(series: Path, tmp_path: Path) -> Path:
    """A copy of the series with the extensions stripped: CT.1.2.840...123.dcm -> CT.1.2.840...123."""
    out = tmp_path / "pacs_export"
    out.mkdir()
    for file in sorted(series.iterdir()):
        if file.suffix == ".dcm":
            shutil.copy(file, out / file.stem)
    assert not any(p.suffix == ".dcm" for p in out.iterdir())
    return out


def pretrain(capsys, tmp_path: Path, *images: Path) -> dict:
    """`msa pretrain IMAGES` on a tiny random model, 1 step; its JSON line."""
    out = tmp_path / f"pre{len(list(tmp_path.glob('pre*.pt')))}.pt"
    capsys.readouterr()
    code = msa.cli.main(["pretrain", *map(str, images), "--out", str(out), "--backbone", "vit_tiny",
                         "--steps", "1", "--batch-size", "1", "--objectives", "mae"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])


def test_a_dicom_series_without_file_extensions_is_pretrained_on_like_one_with_them(series, stripped, tmp_path,
                                                                                    capsys):
    named = pretrain(capsys, tmp_path, series)
    bare = pretrain(capsys, tmp_path, stripped)
    count = sum(1 for p in series.iterdir() if p.suffix == ".dcm")
    assert (named["images"], named["slices"]) == (1, count), named
    assert (bare["images"], bare["slices"]) == (1, count), bare


def test_a_folder_of_images_includes_its_extensionless_dicom_series(stripped, tmp_path, capsys):
    """A folder holding a NIfTI volume and a DICOM series folder (no extensions): both are used."""
    import SimpleITK as sitk

    parent = tmp_path / "unlabeled"
    parent.mkdir()
    ct, _ = sample_ct()
    shutil.copy(ct, parent / "ct_abdomen.nii.gz")
    shutil.move(str(stripped), parent / "series")
    (parent / "notes.txt").write_text("not an image\n")
    assert list_images(parent) == [parent / "ct_abdomen.nii.gz", parent / "series"]
    result = pretrain(capsys, tmp_path, parent)
    nifti_slices = sitk.ReadImage(str(ct)).GetSize()[2]
    dicom_slices = len(list((parent / "series").iterdir()))
    assert (result["images"], result["slices"]) == (2, nifti_slices + dicom_slices), result


def test_dicom_is_recognised_by_content(series, stripped):
    file = next(iter(sorted(stripped.iterdir())))
    assert is_dicom_file(file) and is_dicom_folder(stripped) and is_dicom_folder(series)
    assert list_images(stripped) == [stripped]
    ct, labels = sample_ct()
    assert not is_dicom_file(ct) and not is_dicom_folder(ct.parent)


def test_a_dicomdir_index_is_not_taken_for_a_series(stripped, tmp_path):
    """A CD / PACS export: a DICOMDIR file (DICOM magic, but an index, not an image) at the root and the
    series in a subfolder: the root is a folder of images holding that series, not a series itself."""
    export = tmp_path / "cd"
    export.mkdir()
    shutil.copytree(stripped, export / "SERIES1")
    shutil.copy(next(iter(sorted(stripped.iterdir()))), export / "DICOMDIR")  # carries the DICM magic
    assert not is_dicom_file(export / "DICOMDIR") and not is_dicom_folder(export)
    assert list_images(export) == [export / "SERIES1"]
