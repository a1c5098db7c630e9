"""NRRD files in memory, numpy + standard library: the volume as uploaded, the label as answered.

Arrays are (K, J, I) (slice, row, column: numpy's order of a vtkImageData scalar array); the file
stores I fastest. Geometry travels as a 4x4 IJK -> RAS matrix; on disk NRRD says LPS, like ITK,
so the server (SimpleITK) reads exactly the voxel grid the volume node has in Slicer.
"""

from __future__ import annotations

import gzip
import re

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_TYPES = {  # numpy dtype -> NRRD type name
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}
_NAMES = {name: dtype for dtype, name in _TYPES.items()}
_NAMES.update({"uchar": np.dtype(np.uint8), "uint8": np.dtype(np.uint8), "uint8_t": np.dtype(np.uint8),
               "signed char": np.dtype(np.int8), "int8": np.dtype(np.int8), "short int": np.dtype(np.int16),
               "int16": np.dtype(np.int16), "ushort": np.dtype(np.uint16), "uint16": np.dtype(np.uint16),
               "unsigned short int": np.dtype(np.uint16), "int32": np.dtype(np.int32), "uint": np.dtype(np.uint32),
               "uint32": np.dtype(np.uint32), "int64": np.dtype(np.int64), "uint64": np.dtype(np.uint64)})


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write(array: np.ndarray, ijk_to_ras: np.ndarray, compress_level: int = 1) -> bytes:
    """(K, J, I) scalar array + IJK->RAS (4x4) -> NRRD bytes (gzip encoding, LPS space)."""
    if array.ndim != 3:
        raise ValueError(f"expected a (K, J, I) array, got shape {array.shape}")
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if np.dtype(dtype.name) not in _TYPES:
        raise ValueError(f"voxel type {array.dtype} cannot be written to NRRD")
    lps = LPS_FROM_RAS @ np.asarray(ijk_to_ras, dtype=float)
    k, j, i = array.shape
    header = [
        "NRRD0004",
        f"type: {_TYPES[np.dtype(dtype.name)]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        "space directions: " + " ".join(_vector(lps[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + _vector(lps[:3, 3]),
    ]
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype.name).newbyteorder("<")).tobytes()
    # mtime=0: the same voxels give the same bytes.
    return ("\n".join(header) + "\n\n").encode("ascii") + gzip.compress(data, compresslevel=compress_level, mtime=0)


def read(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NRRD bytes (a single 3D scalar image, raw or gzip) -> ((K, J, I) array, IJK->RAS 4x4)."""
    end = content.find(b"\n\n")
    if not content.startswith(b"NRRD") or end < 0:
        raise ValueError("not an NRRD file")
    fields: dict[str, str] = {}
    for line in content[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.lstrip("=").strip()
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    if int(fields.get("dimension", 0)) == 2 and len(sizes) == 2:
        sizes.append(1)
    if len(sizes) != 3:
        raise ValueError(f"expected a 3D image, the header says sizes {fields.get('sizes')!r}")
    dtype = _NAMES.get(fields.get("type", "").lower())
    if dtype is None:
        raise ValueError(f"unsupported NRRD type {fields.get('type')!r}")
    payload = content[end + 2:]
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding != "raw":
        raise ValueError(f"unsupported NRRD encoding {encoding!r}")
    dtype = dtype.newbyteorder(">" if fields.get("endian", "little") == "big" else "<")
    i, j, k = sizes
    array = np.frombuffer(payload, dtype=dtype, count=i * j * k).reshape(k, j, i).astype(dtype.newbyteorder("="))

    matrix = np.eye(4)
    directions = re.findall(r"\(([^)]*)\)", fields.get("space directions", ""))
    for axis, text in enumerate(directions[:3]):
        matrix[:3, axis] = [float(v) for v in text.split(",")]
    origin = re.findall(r"\(([^)]*)\)", fields.get("space origin", ""))
    if origin:
        matrix[:3, 3] = [float(v) for v in origin[0].split(",")]
    space = fields.get("space", "left-posterior-superior").lower()
    if space in ("left-posterior-superior", "lps"):
        matrix = LPS_FROM_RAS @ matrix
    elif space not in ("right-anterior-superior", "ras"):
        raise ValueError(f"unsupported NRRD space {space!r}")
    return array, matrix
