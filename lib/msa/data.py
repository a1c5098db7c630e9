"""Datasets for eval and training: image + label-map pairs, and the names of their labels.

DATA may be
- `IMAGE:LABELS` (a file or DICOM folder, and its label map),
- a folder: MSD style (imagesTr/X + labelsTr/X), or pairs `X` + `X_labels.nii.gz` side by side,
- an MSD-style datalist JSON ({"training": [{"image": ..., "label": ...}], "labels": {...}}),
  paths relative to the JSON file.
Label names come from the datalist's "labels", or a sidecar JSON next to the label map
(`X_labels.json` with {"labels": {"1": "spleen", ...}}); otherwise labels are named by id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import MSAError


@dataclass
class Case:
    image: Path
    labels: Path
    names: dict[int, str] = field(default_factory=dict)  # label id -> name

    @property
    def name(self) -> str:
        return self.image.name.split(".")[0]


def sample_ct() -> tuple[Path, Path]:
    """The sample abdominal CT shipped with the package (image, labels); see sample_data/README.md."""
    root = resources.files("msa") / "sample_data"
    return Path(str(root / "ct_abdomen.nii.gz")), Path(str(root / "ct_abdomen_labels.nii.gz"))


def _sidecar_names(labels: Path) -> dict[int, str]:
    stem = labels.name.split(".")[0]
    sidecar = labels.with_name(f"{stem}.json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
        return {int(k): str(v) for k, v in data.get("labels", {}).items()}
    except (ValueError, AttributeError) as exc:
        raise MSAError(f"cannot read label names from {sidecar}: {exc}") from exc


def _case(image: Path, labels: Path, names: dict[int, str] | None = None) -> Case:
    for path in (image, labels):
        if not path.exists():
            raise MSAError(f"not found: {path}")
    return Case(image, labels, names if names is not None else _sidecar_names(labels))


def _is_image(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".png", ".jpg"))


def load_cases(spec: str, split: str | None = None) -> list[Case]:
    """Parse a DATA argument into cases (see the module docstring)."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        image, labels = spec.rsplit(":", 1)
        return [_case(Path(image), Path(labels))]
    if not path.exists():
        raise MSAError(f"data not found: {spec} (give IMAGE:LABELS, a folder or a datalist JSON)")
    if path.is_file() and path.suffix == ".json":
        return _datalist(path, split)
    if path.is_dir():
        cases = _folder(path)
        if not cases:
            raise MSAError(f"no image/label pairs in {path} (expected imagesTr/ + labelsTr/ or X + X_labels.nii.gz)")
        return cases
    raise MSAError(f"cannot use {spec} as data: give IMAGE:LABELS, a folder or a datalist JSON")


def _datalist(path: Path, split: str | None) -> list[Case]:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise MSAError(f"{path} is not valid JSON: {exc}") from exc
    split = split or ("validation" if "validation" in data else "training")
    if not isinstance(data.get(split), list):
        raise MSAError(f"{path} has no list {split!r}")
    names = {int(k): str(v) for k, v in data.get("labels", {}).items()} or None
    cases = []
    for entry in data[split]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MSAError(f"{path}: every {split!r} entry needs 'image' and 'label'")
        cases.append(_case(path.parent / entry["image"], path.parent / entry["label"], names))
    return cases


def _folder(path: Path) -> list[Case]:
    if (path / "imagesTr").is_dir() and (path / "labelsTr").is_dir():
        return [_case(img, path / "labelsTr" / img.name) for img in sorted((path / "imagesTr").iterdir())
                if _is_image(img) and (path / "labelsTr" / img.name).exists()]
    cases = []
    for image in sorted(path.iterdir()):
        stem = image.name.split(".")[0]
        if stem.endswith("_labels") or not _is_image(image):
            continue
        for ext in (".nii.gz", ".nii", ".nrrd", ".png"):
            labels = path / f"{stem}_labels{ext}"
            if labels.exists():
                cases.append(_case(image, labels))
                break
    return cases


def select_labels(requested: str | None, case: Case, present: set[int]) -> dict[int, str]:
    """`--labels spleen,5` -> {1: 'spleen', 5: 'liver'}; all labels present when None."""
    names = {i: case.names.get(i, str(i)) for i in sorted(present) if i != 0}
    if not requested:
        return names
    by_name = {v: k for k, v in case.names.items()}
    out = {}
    for token in (t.strip() for t in requested.split(",") if t.strip()):
        if token.isdigit():
            label = int(token)
        elif token in by_name:
            label = by_name[token]
        else:
            raise MSAError(f"unknown label {token!r} in {case.labels.name}")
        if label not in present:
            raise MSAError(f"label {token!r} is not present in {case.labels.name}")
        out[label] = case.names.get(label, str(label))
    return out
