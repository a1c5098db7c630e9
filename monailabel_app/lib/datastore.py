"""A local datastore that keeps only what it checked, never writes outside the studies folder, and
never leaves a half-written file.

- Ids and tags are names (lib/names.py); every file path it hands out or writes resolves (symlinks
  followed) inside the studies folder.
- An upload goes to a staging folder inside the studies folder, is decoded in full and checked
  there (lib/imagefiles.py), and is then renamed into place: a refused upload changes nothing.
- An image uploaded under an id that has labels replaces the old image only on the grid of those
  labels, and keeps them; on another grid it is refused (422): the labels would no longer lie on
  their image, and they are a person's work, so they are never dropped silently. Remove them first
  (DELETE /datastore/label) or upload under a new id.
- datastore_v2.json is written to a temp file and renamed; every change to the in-memory record
  holds one lock, so the scoring thread and request threads cannot lose each other's writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import SimpleITK as sitk
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from msa.errors import MSAError

from .errors import NotFound
from .imagefiles import Grid, check_image_file, check_label_file, suffix_of
from .names import check_name, inside

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".msa-upload-"
JSON_TMP_PREFIX = ".datastore_v2.json."


class CheckedDatastore(LocalDatastore):
    def __init__(self, studies: str, max_image_bytes: int, **kwargs: Any) -> None:
        self.root = Path(os.path.realpath(studies))
        self.max_image_bytes = max_image_bytes
        self._mutex = threading.RLock()
        super().__init__(studies, **kwargs)

    def remove_leftovers(self) -> None:
        """Staging folders and JSON temp files of a server killed mid-upload or mid-write (call it
        from the server only: a training subprocess must not delete a running upload's folder)."""
        _remove_leftovers(self.root)

    # -- paths: inside the studies folder, or refused ----------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        return str(inside(self.root, uri, f"image {image_id!r}")) if uri else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        return str(inside(self.root, uri, f"label {label_id!r} ({label_tag})")) if uri else ""

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        kept = []
        for item in super().datalist(full_path):
            if all(inside_or_none(self.root, item[key]) for key in ("image", "label")):
                kept.append(item)
            else:
                logger.warning(f"training skips {item['image']}: it resolves outside the studies folder")
        return kept

    # -- uploads ---------------------------------------------------------------------------------

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        with open(image_filename, "rb") as source:
            return self.add_image_upload(image_id, source, suffix_of(image_filename), image_info)

    def add_image_upload(self, image_id: str, source: IO[bytes], suffix: str, info: dict[str, Any] | None) -> str:
        name = check_name(image_id, "image id")
        info = dict(info or {})  # the client's keys were checked by the route (lib/params.check_info)
        with self._staged(source, f"{name}{suffix}") as staged:
            grid = check_image_file(staged, f"image {name!r}", self.max_image_bytes)
            with self._mutex, FileLock(self._lock_file):
                old = self._datastore.objects.get(name)
                labels = dict(old.labels) if old is not None else {}
                self._check_labels_fit(name, grid, labels)  # before anything changes
                dest = inside(self.root, self.root / self._datastore.images_dir / staged.name, f"image {name!r}")
                os.replace(staged, dest)
                if old is not None and old.image.ext != suffix:  # same id, other file type: one file per id
                    inside(self.root, dest.with_name(name + old.image.ext), "old image").unlink(missing_ok=True)
                info.update(ts=int(time.time()), name=dest.name)
                self._datastore.objects[name] = ImageLabelModel(image=DataModel(info=info, ext=suffix), labels=labels)
                self._update_datastore_file(lock=False)
        logger.info(f"stored image {name!r} ({suffix})")
        return name

    def _check_labels_fit(self, name: str, grid: Grid, labels: dict[str, DataModel]) -> None:
        """MSAError (422) unless every stored label of image `name` lies on `grid` (a new image's)."""
        for tag in sorted(labels):
            uri = self.get_label_uri(name, tag)
            if not uri or not os.path.isfile(uri):
                continue  # listed but gone: nothing to keep in line
            try:
                problem = grid.mismatch(_grid_of(uri))
            except Exception:  # ITK's message is long and names server paths
                problem = "that label file cannot be read"
            if problem:
                raise MSAError(f"image {name!r} has a {tag!r} label on another grid ({problem}): the new image "
                               f"would not match its labels; remove them first (DELETE /datastore/label?id={name}"
                               f"&tag={tag}) or upload the image under a new id")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        with open(label_filename, "rb") as source:
            return self.save_label_upload(image_id, source, suffix_of(label_filename), label_tag, label_info)

    def save_label_upload(self, image_id: str, source: IO[bytes], suffix: str, tag: str,
                          info: dict[str, Any] | None) -> str:
        name, tag = check_name(image_id, "image id"), check_name(tag, "label tag")
        info = dict(info or {})
        image_uri = self.get_image_uri(name)
        if not image_uri:
            raise NotFound(f"no image {name!r} in the datastore")
        with self._staged(source, f"{name}{suffix}") as staged:
            check_label_file(staged, f"label for {name!r}", self.max_image_bytes, _grid_of(image_uri), name)
            with self._mutex, FileLock(self._lock_file):
                obj = self._datastore.objects.get(name)
                if obj is None:  # removed while the label was checked
                    raise NotFound(f"no image {name!r} in the datastore")
                folder = inside(self.root, self._datastore.label_path(tag), f"label tag {tag!r}")
                folder.mkdir(parents=True, exist_ok=True)
                dest = inside(self.root, folder / staged.name, f"label {name!r} ({tag})")
                os.replace(staged, dest)
                old = obj.labels.get(tag)
                if old is not None and old.ext != suffix:
                    inside(self.root, folder / (name + old.ext), "old label").unlink(missing_ok=True)
                info.update(ts=int(time.time()), name=dest.name)
                obj.labels[tag] = DataModel(info=info, ext=suffix)
                self._update_datastore_file(lock=False)
        logger.info(f"stored label {name!r} ({tag}, {suffix})")
        return name

    @contextlib.contextmanager
    def _staged(self, source: IO[bytes], filename: str) -> Iterator[Path]:
        """The upload's bytes in a fresh folder inside the studies folder (same file system as the
        final place, so the last step is a rename); the folder goes whatever happens."""
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            staged = folder / filename
            with open(staged, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 22)
            yield staged
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- other changes: only of what exists (404 otherwise), under one lock -----------------------------

    def remove_image(self, image_id: str) -> None:
        with self._mutex:
            if image_id not in self._datastore.objects:
                raise NotFound(f"no image {image_id!r} in the datastore")
            # LocalDatastore deletes the symlink's TARGET: refuse one that points outside first.
            self.get_image_uri(image_id)
            super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._mutex:
            if self._datastore.label(label_id, label_tag) is None:
                raise NotFound(f"no {label_tag!r} label for image {label_id!r}")
            super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self._mutex:
            if image_id not in self._datastore.objects:
                raise NotFound(f"no image {image_id!r} in the datastore")
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._mutex:
            if self._datastore.label(label_id, label_tag) is None:
                raise NotFound(f"no {label_tag!r} label for image {label_id!r}")
            super().update_label_info(label_id, label_tag, info)

    def refresh(self) -> None:
        with self._mutex:
            super().refresh()

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Temp file + rename: a crash mid-write never leaves a truncated datastore_v2.json."""
        with self._mutex, (FileLock(self._lock_file) if lock else contextlib.nullcontext()):
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            fd, tmp = tempfile.mkstemp(prefix=JSON_TMP_PREFIX, suffix=".tmp", dir=self.root)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                os.chmod(tmp, 0o644)
                os.replace(tmp, self._datastore_config_path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._config_ts = os.stat(self._datastore_config_path).st_mtime


def inside_or_none(root: Path, path: str) -> Path | None:
    try:
        return inside(root, path, "file")
    except Exception:
        return None


def _grid_of(path: str) -> Grid:
    """The image's grid from its header alone (no voxels read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return Grid(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                tuple(reader.GetDirection()))


def _remove_leftovers(root: Path) -> None:
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(JSON_TMP_PREFIX) and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
