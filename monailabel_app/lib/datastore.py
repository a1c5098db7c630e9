"""A local datastore that refuses what it cannot use, before anything is written."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from msa.errors import MSAError
from msa.io import load_image

logger = logging.getLogger(__name__)


class CheckedDatastore(LocalDatastore):
    """MONAI Label's LocalDatastore, with uploads checked first: an image must be an image MSA can
    read (2D/3D, grey or RGB, finite), a label must be readable, on its image's grid, with integer
    values. A refused upload is a 4xx and leaves the studies folder and datastore JSON untouched."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        try:
            load_image(image_filename)
        except MSAError as exc:
            raise HTTPException(status_code=415, detail=f"not an image MSA can use: {exc}") from None
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        try:
            label = sitk.ReadImage(label_filename)
        except Exception:
            raise HTTPException(status_code=415, detail="the label file is not a readable image") from None
        image = load_image(image_uri)
        if tuple(label.GetSize()) != tuple(image.geometry.GetSize()):
            raise HTTPException(status_code=422, detail=f"label size {label.GetSize()} does not match image "
                                                        f"{image_id!r} size {image.geometry.GetSize()}")
        values = sitk.GetArrayViewFromImage(label)
        if label.GetNumberOfComponentsPerPixel() != 1 or not np.array_equal(values, np.round(values)):
            raise HTTPException(status_code=422, detail="a label map must hold one integer label per voxel")
        return super().save_label(image_id, label_filename, label_tag, label_info)
