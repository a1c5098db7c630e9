"""Request parameters, parsed and type-checked before any work starts.

Every JSON the app accepts (infer params, train params, next-sample params, image / label info) is
read by `parse_json_object` (bounded nesting, no NaN / Infinity, an object at the top) and then
checked by a strict pydantic model: JSON types must match exactly (no "4" for 4, no true for 1),
numbers are finite and bounded, and a key the model does not know is refused with the list of the
keys it does. Problems are MSAErrors (422) with one line naming the key.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from msa.errors import MSAError, PromptError

from .names import check_name

MAX_POINTS = 1000  # clicks per request; a person never sends more
MAX_INDEX = 2**31 - 1  # voxel indices beyond this are no image's
MAX_TEXT = 128
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")  # label files the infer tasks write (SimpleITK writers)
RESERVED_INFO = ("name", "ts", "path", "strategy", "user", "msa_confidence")  # written by the server only


def _refuse_constant(token: str) -> float:
    raise ValueError(f"{token} is not a number JSON allows")


def parse_json_object(text: str | bytes | None, what: str) -> dict[str, Any]:
    """A JSON object from a request; empty text is {}. MSAError (422) otherwise."""
    if text is None or (isinstance(text, (str, bytes)) and not text.strip()):
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise MSAError(f"{what} nests too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit integer, NaN
        raise MSAError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise MSAError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _name(value: str) -> str:
    try:
        return check_name(value, "value")
    except MSAError as exc:
        raise ValueError(str(exc)) from None


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Name = Annotated[str, AfterValidator(_name)]
VoxelIndex = Annotated[float, Field(ge=0, le=MAX_INDEX), AfterValidator(_finite)]
Point = Annotated[list[VoxelIndex], Field(min_length=3, max_length=3)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class StrictParams(BaseModel):
    """Exact JSON types, no unknown keys; `parse` turns pydantic's errors into one MSAError line."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    what: ClassVar[str] = "params"

    @classmethod
    def parse(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise MSAError(f"{cls.what} must be a JSON object, got {_json_type(values)}")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise MSAError(_one_line(exc, cls)) from None


def _one_line(error: ValidationError, model: type[StrictParams]) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"unknown {model.what} key {where!r}; accepted keys: {known}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{model.what}.{where}: {message}"


class InferParams(StrictParams):
    """What the infer tasks take: clicks and an ROI in voxel indices [i, j, k] of the stored image."""

    what: ClassVar[str] = "params"
    foreground: Annotated[list[Point], Field(max_length=MAX_POINTS)] = []
    background: Annotated[list[Point], Field(max_length=MAX_POINTS)] = []
    roi: Annotated[list[VoxelIndex], Field(max_length=6)] = []  # [i0, i1, j0, j1, k0, k1]; [] = none
    label: Text = None  # structure name; must be one the model lists
    text: Text = None  # names the structure as a target prompt: one of the adapters' targets (/info/ msa.targets)
    slice: Annotated[int, Field(ge=0, le=MAX_INDEX)] = None  # msa_2d: the slice (default: first click's)
    result_extension: Literal[RESULT_EXTENSIONS] = ".nii.gz"
    save_label: bool = False  # also store the result in the datastore, under label_tag
    label_tag: Name = "original"
    client_id: Text | None = None  # MONAI Label's client sends it (null unless configured); unused

    def model_post_init(self, _context: Any) -> None:
        if self.roi and len(self.roi) != 6:
            raise PromptError(f"params.roi must be [i0, i1, j0, j1, k0, k1], got {len(self.roi)} numbers")
        if not self.foreground and not self.roi:
            raise PromptError("give at least one foreground point or an roi")

    def check_against(self, shape_ijk: tuple[int, int, int], dimension: int, labels: list[str]) -> int | None:
        """Every prompt against the image's size, before any encoding; returns the 2D slice (or None)."""
        if self.label is not None and labels and self.label not in labels:
            raise PromptError(f"unknown label {self.label!r}; this model lists {', '.join(labels)}")
        ni, nj, nk = shape_ijk
        for point in self.foreground + self.background:
            i, j, k = point
            if not (i <= ni - 1 and j <= nj - 1 and k <= nk - 1):
                raise PromptError(f"point [{i:g}, {j:g}, {k:g}] lies outside the image (size {ni} x {nj} x {nk})")
            if k != int(k):
                raise PromptError(f"point [{i:g}, {j:g}, {k:g}]: k must be a slice index")
        if self.roi:
            spans = []
            for axis, size in enumerate(shape_ijk):
                lo, hi = sorted(self.roi[2 * axis:2 * axis + 2])
                lo, hi = max(lo, 0.0), min(hi, size - 1.0)
                if hi < lo:
                    raise PromptError(f"roi {self.roi} lies outside the image (size {ni} x {nj} x {nk})")
                spans.append(round(hi) - round(lo))
            if spans[0] == 0 or spans[1] == 0:
                raise PromptError(f"roi {self.roi} is empty: it must span more than one voxel in i and in j")
        if dimension != 2:
            return None
        k = self.slice if self.slice is not None else int(self.foreground[0][2] if self.foreground else self.roi[4])
        if k > nk - 1:
            raise PromptError(f"slice {k} lies outside the image ({nk} slices)")
        if not self.roi and not any(int(p[2]) == k for p in self.foreground):
            raise PromptError(f"no foreground point on slice {k}")  # (an roi's box is used on slice k)
        return k


class TrainParams(StrictParams):
    """What the train task takes (the defaults are what /info/ lists as its config)."""

    what: ClassVar[str] = "train params"
    steps: Annotated[int, Field(ge=1, le=100_000)] = 100
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    lr: Annotated[float, Field(gt=0, le=1), AfterValidator(_finite)] = 1e-4
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    eval_every: Annotated[int, Field(ge=1, le=100_000)] = 25

    # Keys MONAI Label adds on a request's way to a run (its client adds client_id), none of them params.
    PLUMBING: ClassVar[tuple[str, ...]] = ("model", "gpus", "local_rank", "bundle_path", "client_id")

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> TrainParams:
        return cls.parse({k: v for k, v in request.items() if k not in cls.PLUMBING})


class NextSampleParams(StrictParams):
    what: ClassVar[str] = "next-sample params"
    client_id: Text | None = None  # MONAI Label's client sends null unless configured
    label_tag: Name = None
    labels: Annotated[list[Text], Field(max_length=MAX_POINTS)] = None


def check_info(info: dict[str, Any], what: str) -> dict[str, Any]:
    """A client's image / label info: string keys, none of those the server writes itself."""
    for key in info:
        if len(key) > MAX_TEXT:
            raise MSAError(f"{what} key {key[:40]!r}... is longer than {MAX_TEXT} characters")
        if key in RESERVED_INFO:
            raise MSAError(f"{what} key {key!r} is written by the server; choose another key")
    return info
