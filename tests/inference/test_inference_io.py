"""msa.io: reading images of every supported kind, writing label files on the image's own grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import msa
from msa.io import load_image, load_labels, save_labels

from inference_helpers import synthetic_ct, write_volume


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetDimension() == b.GetDimension()
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def some_labels(shape: tuple[int, ...]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    labels[..., 2:7, 3:9] = 1
    labels[..., 10:12, 1:4] = 5
    labels[0, 0, 0] = 2  # a corner voxel: catches flipped or transposed axes
    return labels


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_3d_file_round_trip_keeps_the_grid(tmp_path, suffix):
    ct = synthetic_ct(shape=(5, 16, 20))
    src = write_volume(tmp_path / f"ct{suffix}", ct)
    volume = load_image(src)
    assert volume.voxels.shape == (5, 16, 20) and volume.voxels.dtype == np.float32
    assert volume.shape_ijk == (20, 16, 5)
    np.testing.assert_array_equal(volume.voxels, ct.astype(np.float32))
    assert volume.modality == "ct"  # air at about -800 HU

    labels = some_labels((5, 16, 20))
    out = save_labels(labels, volume, tmp_path / "out" / f"labels{suffix}")
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary file is gone
    written = sitk.ReadImage(str(out))
    assert_same_grid(written, sitk.ReadImage(str(src)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    np.testing.assert_array_equal(load_labels(out, volume), labels)


def test_positive_intensities_are_detected_as_mr(tmp_path):
    mr = np.random.default_rng(1).uniform(0, 900, size=(3, 8, 9)).astype(np.float32)
    volume = load_image(write_volume(tmp_path / "mr.nii.gz", mr))
    assert volume.modality == "mr"
    assert load_image(tmp_path / "mr.nii.gz", modality="ct").modality == "ct"


def test_a_ct_cropped_to_the_body_is_still_ct(ct_paths, tmp_path):
    """The sample CT cut to a box inside the body (no air; fat and lung edge at -400 HU at the lowest):
    Hounsfield units below water mean CT. It used to take -500 HU (air) and call this MR."""
    image = sitk.ReadImage(str(ct_paths[0]))[20:44, 32:52, :]  # i, j, k: a box inside the abdomen
    values = sitk.GetArrayFromImage(image)
    assert -500 < values.min() < -50  # what makes the case: no air, but fat
    sitk.WriteImage(image, str(tmp_path / "cropped.nii.gz"))
    assert load_image(tmp_path / "cropped.nii.gz").modality == "ct"


@pytest.mark.parametrize("description, expected", [("MR T2 HASTE", "mr"), ("Computed tomography, venous", "ct"),
                                                   ("CT abdomen", "ct")])
def test_the_nifti_description_names_the_modality(ct_paths, tmp_path, description, expected):
    """What the file says wins over its values: a CT stored shifted to non-negative values whose header
    says CT is CT; an MR whose values went negative in preprocessing but whose header says MR is MR."""
    import nibabel as nib

    source = nib.load(str(ct_paths[0]))
    values = np.asanyarray(source.dataobj).astype(np.int16)
    if expected == "ct":
        values = values + 1100  # non-negative: the values alone say MR
    image = nib.Nifti1Image(values, source.affine, source.header)
    image.header["descrip"] = description.encode()  # as scanners' converters (dcm2niix) fill it
    nib.save(image, str(tmp_path / "described.nii.gz"))
    assert load_image(tmp_path / "described.nii.gz").modality == expected


def test_one_image_read_as_ct_and_as_mr_gets_each_presets_window(tiny_model, ct_paths):
    """The engine's intensity window is per (image, preset): reading the same file as MR after CT must
    not reuse the CT window (the embedding keys already carried the preset; the window did not)."""
    from msa.engine import Engine
    from msa.transforms import PRESETS

    engine = Engine(tiny_model)
    as_ct, as_mr = load_image(ct_paths[0], modality="ct"), load_image(ct_paths[0], modality="mr")
    assert as_ct.key == as_mr.key
    ct_input = engine.model_input(as_ct, [15])
    mr_input = engine.model_input(as_mr, [15])
    assert not torch_equal(ct_input, mr_input)
    assert torch_equal(mr_input, Engine(tiny_model).model_input(as_mr, [15]))
    assert PRESETS["ct"].window(as_ct.voxels) != PRESETS["mr"].window(as_mr.voxels)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_save_labels_overwrites_atomically_and_rejects_wrong_shape(tmp_path):
    volume = load_image(write_volume(tmp_path / "ct.nii.gz", synthetic_ct(shape=(4, 10, 12))))
    target = tmp_path / "labels.nii.gz"
    save_labels(np.ones((4, 10, 12), dtype=np.int64), volume, target)
    save_labels(some_labels((4, 10, 12)), volume, target)
    np.testing.assert_array_equal(load_labels(target, volume), some_labels((4, 10, 12)))
    with pytest.raises(ValueError):
        save_labels(np.zeros((4, 12, 10), dtype=np.int64), volume, tmp_path / "bad.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "labels.nii.gz"]


def test_labels_above_255_are_kept(tmp_path):
    volume = load_image(write_volume(tmp_path / "ct.nii.gz", synthetic_ct(shape=(2, 6, 7))))
    labels = np.zeros((2, 6, 7), dtype=np.int64)
    labels[1, 2, 3] = 300
    out = save_labels(labels, volume, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(load_labels(out, volume), labels)


def test_load_labels_on_another_grid_is_an_image_error(tmp_path):
    volume = load_image(write_volume(tmp_path / "ct.nii.gz", synthetic_ct(shape=(4, 10, 12))))
    other = write_volume(tmp_path / "other.nii.gz", np.zeros((4, 10, 13), dtype=np.uint8))
    with pytest.raises(msa.ImageError):
        load_labels(other, volume)


def test_rgb_png_round_trip(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(18, 25, 3), dtype=np.uint8)
    src = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(src))
    volume = load_image(src)
    assert volume.modality == "rgb" and volume.is_rgb
    assert volume.voxels.shape == (1, 18, 25, 3)
    assert volume.shape_ijk == (25, 18, 1)
    np.testing.assert_array_equal(volume.voxels[0], rgb.astype(np.float32))

    labels = some_labels((1, 18, 25))
    out = save_labels(labels, volume, tmp_path / "photo_labels.png")
    written = sitk.ReadImage(str(out))
    assert_same_grid(written, sitk.ReadImage(str(src)))
    assert written.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_array_equal(load_labels(out, volume), labels)


def test_grey_png_round_trip(tmp_path):
    grey = np.random.default_rng(3).integers(0, 256, size=(14, 11), dtype=np.uint8)
    src = tmp_path / "grey.png"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(src))
    volume = load_image(src)
    assert volume.voxels.shape == (1, 14, 11) and not volume.is_rgb
    assert volume.modality == "mr"  # no negatives: the percentile preset
    np.testing.assert_array_equal(volume.voxels[0], grey.astype(np.float32))
    as_rgb = load_image(src, modality="rgb")
    assert as_rgb.voxels.shape == (1, 14, 11, 3)
    np.testing.assert_array_equal(as_rgb.voxels[0, :, :, 1], grey.astype(np.float32))

    labels = some_labels((1, 14, 11))
    out = save_labels(labels, volume, tmp_path / "grey_labels.png")
    assert_same_grid(sitk.ReadImage(str(out)), sitk.ReadImage(str(src)))
    np.testing.assert_array_equal(load_labels(out, volume), labels)


def test_colour_png_with_grey_modality_is_an_image_error(tmp_path):
    src = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 3), dtype=np.uint8), isVector=True), str(src))
    with pytest.raises(msa.ImageError):
        load_image(src, modality="ct")


def test_dicom_series_folder(shared_data, tmp_path):
    folder = shared_data / "ct_abdomen_dicom"
    volume = load_image(folder)
    assert volume.voxels.shape == (20, 512, 512)
    assert volume.modality == "ct"  # from the DICOM Modality tag
    # A label file written for the series has the series' grid exactly.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    labels = np.zeros((20, 512, 512), dtype=np.int64)
    labels[3, 100:120, 200:260] = 5
    out = save_labels(labels, volume, tmp_path / "dicom_labels.nii.gz")
    assert_same_grid(sitk.ReadImage(str(out)), series)
    np.testing.assert_array_equal(load_labels(out, volume), labels)


# -- bad input -> ImageError, never a traceback from ITK ------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(msa.ImageError, match="not found"):
        load_image(tmp_path / "nothing.nii.gz")


def test_text_file_named_nifti(tmp_path):
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(msa.ImageError) as info:
        load_image(fake)
    assert "\n" not in str(info.value)


def test_4d_nifti(tmp_path):
    import nibabel as nib

    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(msa.ImageError, match="4D"):
        load_image(path)


def test_empty_image(tmp_path):
    import nibabel as nib

    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 4), dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(msa.ImageError):
        load_image(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(msa.ImageError, match="no DICOM series"):
        load_image(tmp_path)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad, suffix):
    """A float image with a NaN or inf voxel is refused. NB: ITK's NIfTI reader turns NaN and inf into
    0 before msa.io sees them, so the .nii.gz case needs a check that does not go through ITK."""
    data = np.zeros((3, 4, 5), dtype=np.float32)
    data[1, 2, 3] = bad
    path = write_volume(tmp_path / f"nan{suffix}", data)
    with pytest.raises(msa.ImageError, match="NaN or infinite"):
        load_image(path)
