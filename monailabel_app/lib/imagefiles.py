"""Uploaded image and label files, decoded in full and checked before the datastore keeps them.

ITK's NIfTI reader (SimpleITK) reads a truncated .nii.gz without a word and fills the missing
voxels with zeros, and ITK's NRRD reader follows a header's `data file:` to any file on the
server. So an upload is read by a strict decoder first (the whole gzip stream with its checksum,
nibabel for NIfTI voxels, a NRRD header check), its decoded size is bounded before anything is
allocated, and only then does SimpleITK (the reader the app uses) read it and agree on the grid.

Stored: 3D, one value per voxel, finite; a label holds non-negative integers on its image's grid.
A file that cannot be decoded is 415; one that decodes but breaks a rule is 422; too big is 413.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from msa.errors import MSAError

from .errors import PayloadTooLarge, UnsupportedFile

SUFFIXES = (".nii.gz", ".nii", ".nrrd")  # single-file formats: no header that names another file
NRRD_TYPES = {  # NRRD type name -> bytes per value
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}
MAX_LABEL_VALUE = 65535


def suffix_of(filename: str | None) -> str:
    """The stored suffix of an upload's file name; UnsupportedFile (415) for any other type."""
    lowered = (filename or "").lower()
    for suffix in SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    raise UnsupportedFile(f"file {str(filename)[:80]!r}: the datastore stores {', '.join(SUFFIXES)} files")


@dataclass(frozen=True)
class Grid:
    """A voxel grid as SimpleITK reports it (i, j, k order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def mismatch(self, other: Grid) -> str | None:
        """Why `other` is not this grid (None: it is); tolerances absorb float32 header rounding."""
        if self.size != other.size:
            return f"size {other.size} differs from {self.size}"
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=1e-6):
            return f"spacing {_fmt(other.spacing)} differs from {_fmt(self.spacing)}"
        if not np.allclose(self.origin, other.origin, rtol=0, atol=1e-3 * max(1.0, *self.spacing)):
            return f"origin {_fmt(other.origin)} differs from {_fmt(self.origin)}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=1e-4):
            return "its axes point elsewhere (direction cosines differ)"
        return None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_image_file(path: Path, shown: str, max_bytes: int) -> Grid:
    """A stored-to-be image: decodes in full, 3D, one finite value per voxel. Returns its grid."""
    image, voxels = _decode(path, shown, max_bytes)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise MSAError(f"{shown} contains NaN or infinite values")
    return Grid.of(image)


def check_label_file(path: Path, shown: str, max_bytes: int, image_grid: Grid, image_id: str) -> Grid:
    """A label map: decodes in full, non-negative integers, on the grid of image `image_id`."""
    image, voxels = _decode(path, shown, max_bytes)
    grid = Grid.of(image)
    problem = image_grid.mismatch(grid)
    if problem:
        raise MSAError(f"{shown} is not on the grid of image {image_id!r}: {problem}")
    if voxels.dtype.kind == "f" and not (np.isfinite(voxels).all() and np.array_equal(voxels, np.round(voxels))):
        raise MSAError(f"{shown} holds non-integer values: a label map holds one integer label per voxel")
    if voxels.size and (voxels.min() < 0 or voxels.max() > MAX_LABEL_VALUE):
        raise MSAError(f"{shown} holds values outside 0..{MAX_LABEL_VALUE}")
    return grid


def _decode(path: Path, shown: str, max_bytes: int) -> tuple[sitk.Image, np.ndarray]:
    suffix = suffix_of(path.name)
    if suffix == ".nrrd":
        declared = _check_nrrd_header(path, shown, max_bytes)
        strict = None
    else:
        if suffix == ".nii.gz":
            _check_gzip_stream(path, shown, max_bytes)
        strict = _read_nifti(path, shown, max_bytes)
        declared = strict.shape
    try:
        image = sitk.ReadImage(str(path))
    except Exception:  # ITK's message is long, multi-line, and names server paths
        raise UnsupportedFile(f"{shown} cannot be decoded (damaged or truncated)") from None
    if image.GetDimension() != 3:
        raise MSAError(f"{shown} is {image.GetDimension()}D; the datastore stores 3D images")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MSAError(f"{shown} has {image.GetNumberOfComponentsPerPixel()} values per voxel; store grey images")
    if tuple(image.GetSize()) != tuple(declared) or 0 in image.GetSize():
        raise UnsupportedFile(f"{shown}: its header declares {tuple(declared)} voxels, the reader found "
                              f"{tuple(image.GetSize())}")
    # NIfTI: nibabel's voxels (ITK turns NaN into 0 there); NRRD: ITK's reader is the strict one.
    return image, strict if strict is not None else sitk.GetArrayViewFromImage(image)


def _check_gzip_stream(path: Path, shown: str, max_bytes: int) -> None:
    """Decompress the whole stream: a truncated or corrupted file fails here (end marker, CRC)."""
    limit = max_bytes + (1 << 20)  # voxels plus a NIfTI header and extensions
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"{shown} decompresses to more than {_mb(max_bytes)}")
    except (OSError, EOFError, zlib.error) as exc:
        raise UnsupportedFile(f"{shown} is not a complete gzip file ({str(exc)[:80]})") from None


def _read_nifti(path: Path, shown: str, max_bytes: int) -> np.ndarray:
    import nibabel as nib

    try:
        header_only = nib.load(str(path))
    except Exception:
        raise UnsupportedFile(f"{shown} is not a NIfTI file") from None
    shape = header_only.shape
    if len(shape) != 3:
        raise MSAError(f"{shown} is {len(shape)}D (shape {shape}); the datastore stores 3D images")
    nbytes = int(np.prod(shape, dtype=np.int64)) * header_only.get_data_dtype().itemsize
    if nbytes > max_bytes:
        raise PayloadTooLarge(f"{shown} holds {_mb(nbytes)} of voxels; this server takes up to "
                              f"{_mb(max_bytes)} (--conf max_image_mb)")
    try:
        return np.asanyarray(header_only.dataobj)
    except Exception:  # nibabel's message names the server's temp path
        raise UnsupportedFile(f"{shown}: its voxel data is truncated or damaged") from None


def _check_nrrd_header(path: Path, shown: str, max_bytes: int) -> tuple[int, ...]:
    """The header of an attached-header NRRD; returns its sizes (i, j, k)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        magic = handle.readline(64)
        if not magic.startswith(b"NRRD000"):
            raise UnsupportedFile(f"{shown} is not a NRRD file")
        for _ in range(1000):
            line = handle.readline(8192)
            if not line or line in (b"\n", b"\r\n"):
                break
            text = line.decode("latin-1").strip()
            if text.startswith("#") or ":=" in text or ":" not in text:
                continue
            key, value = text.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise UnsupportedFile(f"{shown} names a separate data file; upload a NRRD with its data attached")
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise UnsupportedFile(f"{shown}: NRRD encoding {encoding or 'missing'!r}; use raw or gzip")
    try:
        dimension = int(fields["dimension"])
        sizes = tuple(int(v) for v in fields["sizes"].split())
        itemsize = NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        raise UnsupportedFile(f"{shown}: NRRD header without a valid type, dimension or sizes") from None
    if dimension != 3 or len(sizes) != 3:
        raise MSAError(f"{shown} is {dimension}D; the datastore stores 3D images")
    if min(sizes) < 1:
        raise UnsupportedFile(f"{shown}: NRRD sizes {sizes}")
    if int(np.prod(sizes, dtype=np.float64)) * itemsize > max_bytes:
        raise PayloadTooLarge(f"{shown} holds more than {_mb(max_bytes)} of voxels (--conf max_image_mb)")
    return sizes
