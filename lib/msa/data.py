"""Datasets for eval and training: image + label-map pairs, and the names of their labels.

DATA may be
- `IMAGE:LABELS` (a file or DICOM folder, and its label map),
- a folder: MSD style (imagesTr/X + labelsTr/X), or pairs `X` + `X_labels.nii.gz` side by side,
- an MSD-style datalist JSON ({"training": [{"image": ..., "label": ...}], "labels": {...}}),
  paths relative to the JSON file.
Label names come from the datalist's "labels", a folder's `labels.json` ({"1": "spleen", ...}), or a
sidecar JSON next to the label map (`X_labels.json` with {"labels": {"1": "spleen", ...}}); otherwise
labels are named by id.

A *source* (training and evaluation take several) is DATA followed by options, each `::key=value`:

    ../shared/data/btcv::cases=0-17::labels=spleen,liver
    brain.nii.gz:aseg.nii.gz::names=freesurfer-aseg::whole=brain::axes=k,j::stride=2::weight=0.5

split=KEY (datalist list), cases=0-17,20 (numbers in the image file names), labels=a,b (names or ids;
default all; none: only the whole structure), whole=NAME (one more structure: every labelled voxel), names=TABLE|FILE.json (label
names: a table shipped with msa, or a JSON file), preset=ct|mr|rgb (intensity preset; default
detected), axes=k,j,i (slice directions; default k, as stored), stride=N (every N-th slice),
weight=W (share of training samples, relative to the other sources), name=NAME (in reports).
"""

from __future__ import annotations

import json
import re
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
    names = read_label_table(path / "labels.json") if (path / "labels.json").is_file() else None
    cases = []
    for image in sorted(path.iterdir()):
        stem = image.name.split(".")[0]
        if stem.endswith("_labels") or not _is_image(image):
            continue
        for ext in (".nii.gz", ".nii", ".nrrd", ".png"):
            labels = path / f"{stem}_labels{ext}"
            if labels.exists():
                cases.append(_case(image, labels, names))
                break
    return cases


# -- label tables ---------------------------------------------------------------------------------

LABEL_TABLES = {"freesurfer-aseg": "freesurfer_aseg.json"}  # shipped in msa/label_tables/


def read_label_table(path: Path) -> dict[int, str]:
    """A JSON object {"id": "name"} (or {"labels": {...}}) -> {id: name}."""
    try:
        data = json.loads(Path(path).read_text())
        data = data.get("labels", data)
        return {int(k): str(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise MSAError(f"cannot read label names from {path}: {exc}") from exc


def _label_table(spec: str) -> dict[int, str]:
    if spec in LABEL_TABLES:
        return read_label_table(Path(str(resources.files("msa") / "label_tables" / LABEL_TABLES[spec])))
    if not Path(spec).is_file():
        raise MSAError(f"names={spec}: neither a label table shipped with msa ({', '.join(LABEL_TABLES)}) "
                       "nor a JSON file")
    return read_label_table(Path(spec))


# -- sources --------------------------------------------------------------------------------------

Structures = dict[str, tuple[int, ...]]  # structure name -> the label ids that make it


@dataclass
class Source:
    """One data set with the options that say how to use it (see the module docstring)."""

    name: str
    cases: list[Case]
    labels: str | None = None
    whole: str | None = None
    preset: str | None = None
    axes: tuple[str, ...] = ("k",)
    stride: int = 1
    weight: float = 1.0

    def structures(self, case: Case, present: set[int]) -> Structures:
        """The structures to segment in one case, from the labels present in its label map."""
        present = {v for v in present if v != 0}
        if self.labels == "none":  # only the whole structure
            out = {}
        elif self.labels:
            out = {name: (label,) for label, name in resolve_labels(self.labels, case.names).items() if label in present}
        else:
            out = {case.names.get(label, str(label)): (label,) for label in sorted(present)}
        if self.whole and present:
            out[self.whole] = tuple(sorted(present))
        return out

    def describe(self) -> dict:
        """JSON-ready: the cases (file names) and options, as adapter files record their training data."""
        return {"name": self.name, "images": [c.image.name for c in self.cases], "labels": self.labels,
                "whole": self.whole, "preset": self.preset, "axes": list(self.axes), "stride": self.stride,
                "weight": self.weight}

    def check_labels_present(self) -> None:
        """MSAError naming a requested label that no case's label map holds (read before any
        encoding; a label missing from some cases only, a removed gallbladder say, is fine)."""
        tokens = _label_tokens(self.labels)
        if not tokens or not self.cases:
            return
        check_label_names(self.labels, self.cases)  # each case resolves a name with its own names
        from .io import label_values

        present = [label_values(case.labels) for case in self.cases]
        for token in tokens:
            if not any(label in values for case, values in zip(self.cases, present)
                       for label in resolve_labels(token, case.names)):
                name = next(iter(resolve_labels(token, self.cases[0].names).values()))
                where = self.cases[0].labels.name if len(self.cases) == 1 else f"any of the {len(self.cases)} cases"
                raise MSAError(f"label {name!r} is not present in {where}")


_OPTIONS = ("split", "cases", "labels", "whole", "names", "preset", "axes", "stride", "weight", "name")


def parse_source(spec: str, split: str | None = None, labels: str | None = None) -> Source:
    """`DATA[::key=value]...` -> Source; `split` and `labels` are the defaults of those options."""
    data, *options = spec.split("::")
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _OPTIONS or not value:
            raise MSAError(f"bad source option {option!r} in {spec!r}: use key=value with key one of "
                           f"{', '.join(_OPTIONS)}")
        values[key] = value
    cases = load_cases(data, split=values.get("split", split))
    if "cases" in values:
        wanted = _number_set(values["cases"], spec)
        cases = [c for c in cases if _case_number(c) in wanted]
        if not cases:
            raise MSAError(f"{spec}: no case numbered {values['cases']}")
    if "names" in values:
        table = _label_table(values["names"])
        for case in cases:
            case.names = dict(table)
    from .io import SLICE_AXES
    from .transforms import PRESETS

    axes = tuple(a.strip() for a in values.get("axes", "k").split(","))
    if not axes or any(a not in SLICE_AXES for a in axes):
        raise MSAError(f"{spec}: axes must be some of {', '.join(SLICE_AXES)}")
    preset = values.get("preset")
    if preset is not None and preset not in PRESETS:
        raise MSAError(f"{spec}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    try:
        stride, weight = int(values.get("stride", 1)), float(values.get("weight", 1))
    except ValueError:
        raise MSAError(f"{spec}: stride must be an integer and weight a number") from None
    if stride < 1 or not weight > 0:
        raise MSAError(f"{spec}: stride must be >= 1 and weight > 0")
    source = Source(name=values.get("name", _default_name(data)), cases=cases, labels=values.get("labels", labels),
                    whole=values.get("whole"), preset=preset, axes=axes, stride=stride, weight=weight)
    check_label_names(source.labels, cases)  # unknown names fail now, before any image is read
    return source


def _label_tokens(requested: str | None) -> list[str]:
    if not requested or requested == "none":
        return []
    return [t.strip() for t in requested.split(",") if t.strip()]


def check_label_names(requested: str | None, cases: list[Case]) -> None:
    """MSAError unless every case knows every requested label name: each case has its own names
    (a sidecar JSON per label map), so a name may mean another id, or nothing, in another case."""
    if not cases:
        return
    if all(case.names == cases[0].names for case in cases):  # one set of names (a datalist, labels.json)
        resolve_labels(requested, cases[0].names)
        return
    for token in _label_tokens(requested):
        if token.isdigit():
            continue
        missing = [case for case in cases if token not in case.names.values()]
        if missing:
            shown = ", ".join(case.labels.name for case in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            known = ", ".join(sorted(set(missing[0].names.values()))) or "none: use label ids"
            raise MSAError(f"unknown label {token!r} in {len(missing)} of {len(cases)} cases: {shown} "
                           f"(names known in {missing[0].labels.name}: {known})")


def resolve_labels(requested: str | None, names: dict[int, str]) -> dict[int, str]:
    """`spleen,5` -> {1: 'spleen', 5: 'liver'} (names from `names`, ids as given); {} for None."""
    by_name = {v: k for k, v in names.items()}
    out = {}
    for token in _label_tokens(requested):
        if token.isdigit():
            out[int(token)] = names.get(int(token), token)
        elif token in by_name:
            out[by_name[token]] = token
        else:
            known = ", ".join(sorted(by_name)) or "none: use label ids"
            raise MSAError(f"unknown label {token!r} (names known: {known})")
    return out


def _default_name(data: str) -> str:
    path = Path(data.split(":")[0] if not Path(data).exists() else data)
    return path.parent.name if path.suffix == ".json" else path.name.split(".")[0]


def _case_number(case: Case) -> int | None:
    """The first number in the image's name: btcv_07 -> 7, case_03_t2 -> 3."""
    digits = re.findall(r"\d+", case.name)
    return int(digits[0]) if digits else None


def _number_set(text: str, spec: str) -> set[int]:
    numbers: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.partition("-")
        try:
            numbers |= set(range(int(low), int(high) + 1)) if sep else {int(low)}
        except ValueError:
            raise MSAError(f"{spec}: cases takes numbers and ranges such as 0-17,20") from None
    return numbers
