"""Reading images and writing label files on the image's own voxel grid.

Everything goes through SimpleITK (ITK's readers: NIfTI, NRRD, MHA, DICOM series folders, PNG,
JPEG), so a label file we write has the input's exact geometry (origin, spacing, direction) and
any viewer overlays it in place. Voxel indices [i, j, k] are ITK's; the numpy array is ITK's
(k, j, i) order, so slice k is array[k] with rows j and columns i, i.e. SAM's (x, y) = (i, j).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Volume:
    """An image as (K, J, I) raw intensities, or (1, J, I, 3) for a colour photograph."""

    voxels: np.ndarray
    geometry: sitk.Image = field(repr=False)  # the voxel grid: size, origin, spacing, direction
    modality: str  # "ct", "mr" or "rgb"
    source: str = ""
    _key: str | None = field(default=None, repr=False)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.voxels.shape[:3]
        return i, j, k

    @property
    def is_rgb(self) -> bool:
        return self.voxels.ndim == 4

    @property
    def key(self) -> str:
        """Content hash: names the image in embedding caches."""
        if self._key is None:
            digest = hashlib.sha1(str(self.voxels.shape).encode())
            digest.update(np.ascontiguousarray(self.voxels).tobytes())
            self._key = digest.hexdigest()
        return self._key


VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM Part 10 file, after the preamble


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file, by name (.dcm) or by content ('DICM' at byte 128): PACS exports often name
    their files without an extension (IM0001, 1.2.840...)."""
    path = Path(path)
    if path.name.upper() == "DICOMDIR":  # a CD/PACS export's index of its series (in subfolders), not an image
        return False
    if path.suffix.lower() == ".dcm":
        return path.is_file()
    if path.name.lower().endswith(VOLUME_SUFFIXES + RGB_SUFFIXES):
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == DICOM_MAGIC
    except OSError:  # a folder, a file we may not read
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """A folder holding DICOM files (by is_dicom_file's rule): load_image reads it as one series."""
    path = Path(path)
    return path.is_dir() and any(is_dicom_file(p) for p in sorted(path.iterdir()) if p.is_file())


def list_images(path: str | Path) -> list[Path]:
    """The images a path names: a file or a DICOM folder is one image; any other folder gives its
    volume files (NIfTI, NRRD, MHA / MHD) and its DICOM subfolders, sorted by name."""
    path = Path(path)
    if not path.is_dir() or is_dicom_folder(path):
        return [path]
    return [p for p in sorted(path.iterdir())
            if (p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)) or is_dicom_folder(p)]


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageError(f"no DICOM series in folder {path}")
        if len(series) > 1:
            raise ImageError(f"{path} holds {len(series)} DICOM series; point to a folder with one")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        reader.MetaDataDictionaryArrayUpdateOn()
        reader.LoadPrivateTagsOn()
        image = reader.Execute()
        modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else ""
        image.SetMetaData("msa_modality", modality)
        return image
    return sitk.ReadImage(str(path))


def _nifti_has_nonfinite(path: Path) -> bool:
    """ITK 5.4's NIfTI reader silently turns NaN and inf into 0, so ask nibabel (float files only)."""
    if not path.is_file() or not path.name.endswith((".nii", ".nii.gz")):
        return False
    import nibabel as nib

    image = nib.load(str(path))
    return image.get_data_dtype().kind in "fc" and not np.isfinite(np.asanyarray(image.dataobj)).all()


_HEADER_MODALITY = re.compile(r"\b(CT|MRI?|computed tomography|magnetic resonance)\b", re.IGNORECASE)


def guess_modality(image: sitk.Image, voxels: np.ndarray) -> str:
    """The intensity preset of a grey image, "ct" or "mr": from what the file says, else from its values.

    1. DICOM: the Modality tag (0008,0060): CT is CT, anything else gets the MR preset;
    2. NIfTI: the header's description or intent name when it names CT or MR;
    3. the values: CT is in Hounsfield units, where fat is about -100 and air -1000, so a minimum at
       or below -50 means CT even when the image is cropped to the body (no air); MR magnitudes are
       not negative, and intensity-normalised MR stays within a few units of zero.
    An image that fits neither (a CT shifted to non-negative values, say) needs --modality.
    """
    if image.HasMetaDataKey("msa_modality") and image.GetMetaData("msa_modality"):
        return "ct" if image.GetMetaData("msa_modality").upper() == "CT" else "mr"
    for key in ("descrip", "intent_name"):
        found = _HEADER_MODALITY.search(image.GetMetaData(key)) if image.HasMetaDataKey(key) else None
        if found:
            return "ct" if found.group(1).lower() in ("ct", "computed tomography") else "mr"
    return "ct" if voxels.min() <= CT_MINIMUM else "mr"


CT_MINIMUM = -50.0  # HU: below water by more than any noise, above fat (about -100)


def load_image(path: str | Path, modality: str | None = None) -> Volume:
    """Open an image file or DICOM folder; `modality` ("ct" | "mr" | "rgb") overrides detection."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    try:
        image = _read_sitk(path)
    except ImageError:
        raise
    except Exception as exc:  # ITK's message is long and multi-line; keep its gist
        raise ImageError(f"cannot read image {path}: not a readable image or DICOM series") from exc

    voxels = sitk.GetArrayFromImage(image)
    channels = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 2:
        voxels = voxels[None]  # one slice
    elif image.GetDimension() != 3:
        raise ImageError(f"{path} is {image.GetDimension()}D; MSA segments 2D and 3D images")
    if channels not in (1, 3):
        raise ImageError(f"{path} has {channels} components per voxel; use a grey or RGB image")
    if voxels.size == 0 or min(voxels.shape[:3]) == 0:
        raise ImageError(f"{path} is empty (shape {voxels.shape})")
    voxels = voxels.astype(np.float32)
    if not np.isfinite(voxels).all() or _nifti_has_nonfinite(path):
        raise ImageError(f"{path} contains NaN or infinite values")

    if modality is None:
        modality = "rgb" if channels == 3 else guess_modality(image, voxels)
    if modality == "rgb" and channels != 3:
        voxels = np.repeat(voxels[..., None], 3, axis=-1)
    elif modality != "rgb" and channels == 3:
        raise ImageError(f"{path} is a colour image; use modality 'rgb'")

    geometry = sitk.Image(image.GetSize(), sitk.sitkUInt8)  # the grid only: one byte a voxel
    geometry.CopyInformation(image)
    return Volume(voxels=voxels, geometry=geometry, modality=modality, source=str(path))


def label_image(labels: np.ndarray, volume: Volume) -> sitk.Image:
    """(K, J, I) label array -> an ITK image with the volume's geometry."""
    if labels.shape != volume.voxels.shape[:3]:
        raise ValueError(f"labels {labels.shape} do not match image {volume.voxels.shape[:3]}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    if volume.geometry.GetDimension() == 2:
        image = sitk.GetImageFromArray(labels[0].astype(dtype))
    else:
        image = sitk.GetImageFromArray(labels.astype(dtype))
    image.CopyInformation(volume.geometry)
    return image


def save_labels(labels: np.ndarray, volume: Volume, path: str | Path) -> Path:
    """Write a label file on the volume's grid, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = label_image(labels, volume)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ImageError(f"cannot write {path}: {exc}") from exc
    return path


def _integer_labels(labels: np.ndarray) -> np.ndarray:
    """The file's own integer type (uint8 for most label maps: training holds every volume's labels in
    memory, and int64 made a 512 x 512 x 100 map 200 MB); float label maps (some tools write them) -> int32."""
    return labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int32)


def load_labels(path: str | Path, volume: Volume) -> np.ndarray:
    """A label file on the volume's grid -> (K, J, I) integer array (same voxel grid required)."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:
        raise ImageError(f"cannot read label file {path}") from exc
    labels = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        labels = labels[None]
    if labels.shape != volume.voxels.shape[:3]:
        raise ImageError(f"label file {path} has shape {labels.shape}, image has {volume.voxels.shape[:3]}")
    return _integer_labels(labels)


def resample_labels_to(labels_path: str | Path, volume: Volume) -> np.ndarray:
    """A label file on ANY grid, resampled (nearest neighbour, by world coordinates) onto the volume's grid.

    A label map none of whose labelled voxels falls inside the image (another scan's, say) is refused
    rather than read as empty; one that covers more than the image (the image is a crop) is fine.
    """
    try:
        image = sitk.ReadImage(str(labels_path))
    except Exception as exc:
        raise ImageError(f"cannot read label file {labels_path}") from exc
    out = sitk.Resample(image, volume.geometry, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    labels = sitk.GetArrayFromImage(out)
    labels = _integer_labels(labels[None] if out.GetDimension() == 2 else labels)
    if not labels.any() and np.any(sitk.GetArrayViewFromImage(image)):
        raise ImageError(f"{Path(labels_path).name} does not lie on the grid of {Path(volume.source).name}: "
                         "none of its labelled voxels falls inside the image")
    return labels


def label_values(labels_path: str | Path) -> set[int]:
    """The non-zero label ids a label file holds, on its own grid."""
    try:
        image = sitk.ReadImage(str(labels_path))
    except Exception as exc:
        raise ImageError(f"cannot read label file {labels_path}") from exc
    return set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - {0}


SLICE_AXES = ("k", "j", "i")  # the voxel axis slices run along: k as stored, or across it


def reslice(volume: Volume, labels: np.ndarray | None, axis: str) -> tuple[Volume, np.ndarray | None]:
    """The volume (and its (K, J, I) label map) re-stacked so that slices run along voxel axis `axis`.

    'k' returns them unchanged; 'j' gives slices (K, I) stacked along j, 'i' gives slices (K, J)
    stacked along i. The new grid keeps the spacing of each axis (identity direction, origin 0): it
    serves 2D training and scoring in another orientation, not writing files back onto the image.
    """
    if axis not in SLICE_AXES:
        raise ImageError(f"unknown slice axis {axis!r}; choose one of {', '.join(SLICE_AXES)}")
    if axis == "k" or volume.is_rgb:
        return volume, labels
    order = (1, 0, 2) if axis == "j" else (2, 0, 1)  # array axes (K, J, I) -> (slice axis, rows, cols)
    voxels = np.ascontiguousarray(volume.voxels.transpose(order))
    spacing_kji = tuple(reversed(volume.geometry.GetSpacing()))
    geometry = sitk.Image([int(n) for n in reversed(voxels.shape)], sitk.sitkUInt8)
    geometry.SetSpacing([float(spacing_kji[a]) for a in reversed(order)])
    resliced = Volume(voxels=voxels, geometry=geometry, modality=volume.modality,
                      source=f"{volume.source} (slices along {axis})")
    return resliced, None if labels is None else np.ascontiguousarray(labels.transpose(order))
