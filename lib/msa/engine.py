"""The engine: one model, its embedding cache and its preprocessing, shared by every session.

The image encoder is the expensive part (seconds per slice on a CPU); the prompt encoder and mask
decoder are cheap. So the engine encodes each slice once (in 3D mode: each slab of slices, since
the depth branch mixes them), keeps the embeddings in a byte-bounded LRU cache keyed by image
content, and every prompt afterwards only runs the decoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .errors import MSAError
from .io import Volume
from .modeling.msa import MSA
from .runtime import OpenVINOEncoder, TorchEncoder
from .store import FeatureStore
from .transforms import PRESETS, SliceGeometry, apply_window, slice_to_rgb


class EmbeddingCache:
    """LRU mapping key -> tensor, bounded by the total bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.lock = threading.RLock()  # held by an engine while it looks up and fills entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.in_flight: dict[tuple, Future] = {}  # keys an engine is encoding now (engine.embeddings)

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> torch.Tensor | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if key in self._items:
            self.bytes -= self._nbytes(self._items.pop(key))
        self._items[key] = value
        self.bytes += self._nbytes(value)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= self._nbytes(evicted)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.element_size() * t.nelement()


class Engine:
    """Encodes slices (cached) and decodes prompts on them, in image pixel coordinates.

    slab_depth: in 3D mode (model.config.three_d), slices are encoded together in the fixed slabs of
    this many consecutive slices that `slab_of` gives (training slabs by the same rule).
    """

    def __init__(self, model: MSA, cache_bytes: int = 2 << 30, slab_depth: int = 8, batch_size: int = 4,
                 use_cache: bool = True, progress: bool = False, cache: EmbeddingCache | None = None,
                 store: FeatureStore | None = None, encoder: TorchEncoder | OpenVINOEncoder | None = None) -> None:
        self.model = model.eval()
        # Where the image encoder runs (msa.runtime): PyTorch unless given, e.g. OpenVINO on a CPU.
        self.encoder = encoder if encoder is not None else TorchEncoder(self.model)
        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes)  # may be shared by engines
        # With a store, each slice's trunk (the backbone's input of the model's first adapted encoder block)
        # is kept on disk, and embeddings are computed from it: only the adapted blocks run (msa.store).
        self.store = store
        self.slab_depth = slab_depth if model.config.three_d else 1
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.progress = progress  # a progress bar when one call encodes several batches
        self.encoded_slices = 0  # how many slice encodings the encoder has run: tests and stats read it
        self._counters = threading.local()  # per thread: the open count_encodings() counters
        self._windows: dict[tuple[str, str], tuple[float, float]] = {}

    @property
    def runtime_label(self) -> str:
        """The encoder's runtime and precision: torch, openvino-fp32, openvino-bf16."""
        return getattr(self.encoder, "label", self.encoder.name)

    @contextmanager
    def count_encodings(self):
        """Counts the slice encodings this thread runs inside the block (`.slices`): requests served
        concurrently by one engine each report their own, not the engine's running total."""
        counter = SimpleNamespace(slices=0)
        open_counters = getattr(self._counters, "open", [])
        self._counters.open = [*open_counters, counter]
        try:
            yield counter
        finally:
            self._counters.open = open_counters

    def _encoded(self, slices: int) -> None:
        with self.cache.lock:  # requests encode concurrently
            self.encoded_slices += slices
        for counter in getattr(self._counters, "open", []):
            counter.slices += slices

    # -- preprocessing ---------------------------------------------------------------------------

    def geometry(self, volume: Volume) -> SliceGeometry:
        _, j, i = volume.voxels.shape[:3]
        return SliceGeometry(height=j, width=i, target=self.model.img_size)

    def model_input(self, volume: Volume, ks: list[int]) -> torch.Tensor:
        """Slices ks -> (len(ks), 3, S, S) float in [0, 255]: intensity window, RGB, resize, pad."""
        key = (volume.key, volume.modality)  # one image read as CT and as MR gets two windows
        if key not in self._windows:
            self._windows[key] = PRESETS[volume.modality].window(volume.voxels)
        window = self._windows[key]
        geometry = self.geometry(volume)
        slices = [slice_to_rgb(apply_window(volume.voxels[k], window)) for k in ks]
        return geometry.image_to_model(torch.stack(slices))

    # -- encoder ---------------------------------------------------------------------------------

    def _units(self, volume: Volume, ks: list[int]) -> list[list[int]]:
        """Group slices into encoder passes: whole slabs in 3D, batches of batch_size in 2D."""
        if self.slab_depth > 1:
            slabs = {tuple(slab_of(k, self.slab_depth, volume.voxels.shape[0])) for k in ks}
            return [list(slab) for slab in sorted(slabs)]
        return [ks[n:n + self.batch_size] for n in range(0, len(ks), self.batch_size)]

    @torch.no_grad()
    def embeddings(self, volume: Volume, ks: list[int]) -> torch.Tensor:
        """(len(ks), C, h, w) image embeddings of slices ks, encoding only those not cached.

        The cache lock is held only to look up and to reserve: the encoder runs outside it, so a
        request whose slices are cached never waits for another image's encoding. An encoder pass
        (a batch in 2D, a slab in 3D) in flight is reserved: a second request for its slices waits
        for that pass instead of running it again."""
        # Embeddings from stored (float16) trunks, or computed in bf16, differ slightly from a full float32
        # pass: keep them apart. fp32 in PyTorch and in OpenVINO agree within 1e-5 and share entries, so a
        # server whose OpenVINO export becomes ready mid-session does not encode a volume again.
        model_key = (self.model.encoder_key(), self.store is not None, self.encoder.precision)

        def key(k: int) -> tuple:
            return model_key, volume.key, volume.modality, k

        if not self.use_cache:
            found: dict[int, torch.Tensor] = {}
            for unit in self._units(volume, sorted(set(ks))):
                found.update(zip(unit, self._encode(volume, unit)))
            return torch.stack([found[k] for k in ks])
        waiting: dict[int, Future] = {}
        with self.cache.lock:
            found = {k: self.cache.get(key(k)) for k in ks}
            missing = sorted(k for k in set(ks) if found[k] is None)
            for k in missing:  # slices another request is encoding now
                if key(k) in self.cache.in_flight:
                    waiting[k] = self.cache.in_flight[key(k)]
            units = self._units(volume, [k for k in missing if k not in waiting])
            owned = {k: Future() for unit in units for k in unit}
            for k, future in owned.items():
                self.cache.in_flight[key(k)] = future
        try:
            if self.store is not None and owned:  # the trunks of every slice first, in batches
                self.ensure_trunks(volume, sorted(owned))
            for unit in tqdm(units, desc="encoding", unit="pass", disable=not self.progress or len(units) < 2):
                out = self._encode(volume, unit)
                with self.cache.lock:
                    for k, emb in zip(unit, out):
                        self.cache.put(key(k), emb)
                        self.cache.in_flight.pop(key(k), None)
                for k, emb in zip(unit, out):
                    found[k] = emb
                    owned.pop(k).set_result(emb)
        finally:
            if owned:  # the encoder failed: release the rest, and tell whoever waits on them
                with self.cache.lock:
                    for k in owned:
                        self.cache.in_flight.pop(key(k), None)
                for future in owned.values():
                    future.set_exception(RuntimeError("the encoder pass for this slice failed in another request"))
        for k, future in waiting.items():
            found[k] = future.result()
        return torch.stack([found[k] for k in ks])

    def _encode(self, volume: Volume, unit: list[int]) -> list[torch.Tensor]:
        """One encoder pass over `unit` (a batch, or a whole slab in 3D): compact per-slice embeddings."""
        depth = len(unit) if self.slab_depth > 1 else 1
        if self.store is not None:
            trunk = self.trunks(volume, unit).to(self.model.device, torch.float32)
            out = self.model.image_encoder.from_block(trunk, self._trunk_block(None), depth)
        else:
            images = self.model_input(volume, unit).to(self.model.device)
            out = self.encoder.encode(images, depth)
            self._encoded(len(unit))
        # Compact copies: a view would keep the whole batch (a whole slab in 3D) alive after eviction.
        return [emb.clone() for emb in out]

    @torch.no_grad()
    def trunks(self, volume: Volume, ks: list[int], block: int | None = None) -> torch.Tensor:
        """(len(ks), ...) float16: the backbone's input of adapted block `block` (default: the model's first
        adapted block) for slices ks, from the store; missing ones are computed and stored."""
        block = self._trunk_block(block)
        self.ensure_trunks(volume, ks, block)
        space = FeatureStore.space(self.model.encoder_backbone_hash(), block)
        image = FeatureStore.image(volume.key, volume.modality)
        found = [self.store.get(space, image, k) for k in ks]
        if any(t is None for t in found):  # removed under our feet: compute them again
            self.ensure_trunks(volume, ks, block, force=True)
            found = [self.store.get(space, image, k) for k in ks]
        return torch.stack(found)

    @torch.no_grad()
    def ensure_trunks(self, volume: Volume, ks: list[int], block: int | None = None, force: bool = False) -> None:
        """Compute and store the trunks of slices ks that the store lacks, in batches.

        A trunk is derived from the deepest trunk already stored below it (running only the blocks in
        between, which have zero adapters here) before the whole stem and early blocks run again.
        """
        block = self._trunk_block(block)
        if self.encoder.precision != "fp32":  # one store serves every run: its trunks must be exact
            raise MSAError(f"precision {self.encoder.precision} cannot be used with a feature store (--cache-dir, "
                           "$MSA_CACHE_DIR, training): it keeps fp32 encoder features only")
        backbone, image = self.model.encoder_backbone_hash(), FeatureStore.image(volume.key, volume.modality)
        space = FeatureStore.space(backbone, block)
        missing = [k for k in ks if force or not self.store.path(space, image, k).is_file()]
        plans: dict[int, list[int]] = {}  # block to start from (-1: the images) -> slices
        for k in missing:
            start = next((b for b in range(block - 1, -1, -1)
                          if self.store.path(FeatureStore.space(backbone, b), image, k).is_file()), -1)
            plans.setdefault(start, []).append(k)
        batches = [(start, group[n:n + self.batch_size]) for start, group in plans.items()
                   for n in range(0, len(group), self.batch_size)]
        encoder, device = self.model.image_encoder, self.model.device
        for start, batch in tqdm(batches, desc="encoding", unit="pass", disable=not self.progress or len(batches) < 2):
            if start < 0:
                out = self.encoder.block_input(self.model_input(volume, batch).to(device), block)
                self._encoded(len(batch))
            else:
                lower = [self.store.get(FeatureStore.space(backbone, start), image, k) for k in batch]
                out = encoder.run_blocks(torch.stack(lower).to(device, torch.float32), start, block)
            for k, trunk in zip(batch, out):
                self.store.put(space, image, k, trunk)

    def _trunk_block(self, block: int | None) -> int:
        first_adapted = self.model.first_adapted_block()
        if block is None:
            return first_adapted
        if block > first_adapted:
            raise ValueError(f"a trunk at block {block} would skip the adapters of block {first_adapted}")
        return block

    # -- decoder ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        volume: Volume,
        k: int,
        points: list[tuple[float, float, int]] | None = None,
        box: tuple[float, float, float, float] | None = None,
        mask_input: np.ndarray | None = None,
        *,
        multimask_output: bool | None = None,
        refine_clicks: bool = True,
        target: str | None = None,
    ) -> tuple[np.ndarray, float]:
        """Mask logits (J, I) on slice k and the predicted IoU.

        points: (x=i, y=j, label) with label 1 positive, 0 negative; box: (x0, y0, x1, y1) = (i0, j0, i1, j1);
        mask_input: logits (J, I) of a previous prediction on this slice, as SAM's dense prompt;
        target: the name of the structure meant ("liver", "brain"), one of model.targets (msa.modeling.targets).

        The decode policy is per call, as SAM's predictor takes it:
        multimask_output: a lone click (no box, no mask input) is ambiguous, so SAM decodes three candidate
          masks and keeps the one it trusts most. None: do so unless the model's single-mask output was
          trained for clicks (MSA adapters from fine-tuning, `MSA.single_mask_trained`).
        refine_clicks: clicks alone leave a structure's extent to the model, and boxes are what SAM-style
          decoders segment best; so a click-only prompt is decoded again with the box of its mask (its
          parts under the positive clicks, widened by REFINE_MARGIN) joining the clicks: REFINE_ROUNDS
          times for a lone click, CORRECTIVE_REFINE_ROUNDS times for more clicks (fewer when the box
          stops changing).
        """
        if multimask_output is None:
            multimask_output = not self.model.single_mask_trained
        target_row = None if target is None else self.model.target_row(target)
        geometry = self.geometry(volume)
        embedding = self.embeddings(volume, [k])
        click_only = bool(points) and box is None and mask_input is None
        logits, iou = self._decode(embedding, geometry, points, box, mask_input,
                                   multimask_output and click_only and len(points) == 1, target_row)
        if refine_clicks and click_only:
            used = None
            for _ in range(REFINE_ROUNDS if len(points) == 1 else CORRECTIVE_REFINE_ROUNDS):
                refined = clicked_box(logits > 0, points, margin=REFINE_MARGIN)
                if refined is None or refined == used:  # the same box decodes to the same mask: done
                    break
                logits, iou = self._decode(embedding, geometry, points, refined, None, False, target_row)
                used = refined
        return logits, iou

    def _decode(self, embedding: torch.Tensor, geometry: SliceGeometry, points, box, mask_input,
                multimask: bool, target_row: int | None = None) -> tuple[np.ndarray, float]:
        point_prompt, box_prompt = prompt_tensors([geometry], [points] if points else None,
                                                  [box] if box is not None else None, self.model.device)
        dense = None
        if mask_input is not None:
            side = self.model.prompt_encoder.mask_input_size[0]
            logits = torch.as_tensor(mask_input, dtype=torch.float32)[None, None]
            dense = geometry.mask_to_model(logits, side, fill=float(logits.min())).to(self.model.device)
        targets = None if target_row is None else torch.tensor([target_row], device=self.model.device)
        low_res, iou = self.model.decode(embedding, point_prompt, box_prompt, dense, multimask_output=multimask,
                                         targets=targets)
        best = int(iou[0].argmax())
        logits = geometry.logits_to_image(low_res[:, best:best + 1].float().cpu())[0, 0]
        return logits.numpy(), float(iou[0, best])


def slab_of(k: int, depth: int, n: int) -> range:
    """The slices a 3D encoder pass takes together with slice k of a volume of n slices: the fixed grid
    [0, D), [D, 2D), ... (the last slab may be shorter). Inference and training both slab by it, so the
    depth branch trains on the slabs it answers on."""
    start = k // depth * depth
    return range(start, min(start + depth, n))


def prompt_tensors(geometries: list[SliceGeometry], clicks: list[list[tuple[float, float, int]]] | None,
                   boxes: list[tuple[float, float, float, float]] | None, device: torch.device):
    """Clicks and boxes of a batch of slices, in image pixels, as the model's prompt tensors: points
    ((B, N, 2) model coordinates, (B, N) labels) and boxes (B, 4); None where not given. The engine and
    the trainer both prompt through it. Every slice needs the same number of clicks: padding with
    label -1 is not neutral (the prompt encoder turns it into a "not a point" token the decoder reads)."""
    points = box = None
    if clicks is not None:
        if len({len(c) for c in clicks}) != 1:
            raise ValueError(f"a batch of prompts needs one click count, got {sorted({len(c) for c in clicks})}")
        coords = torch.stack([geometry.coords_to_model(np.array([c[:2] for c in cs], dtype=np.float32))
                              for geometry, cs in zip(geometries, clicks)])
        labels = torch.tensor([[float(c[2]) for c in cs] for cs in clicks])
        points = (coords.to(device), labels.to(device))
    if boxes is not None:
        box = torch.stack([geometry.boxes_to_model(np.array(bx, dtype=np.float32))
                           for geometry, bx in zip(geometries, boxes)]).to(device)
    return points, box


REFINE_MARGIN = 0.1  # of the box's sides: a click's first mask often stops short of the structure's edge
# Rounds of click refinement, measured on the validation split with `python bench/refine_rounds.py --rounds 1,3
# --click3` (README, "The shipped adapters"): 3 rounds for a lone click grow large organs (1-click Dice
# 0.660 -> 0.671) but the corrective clicks that follow do worse (3-click Dice 0.692 -> 0.682, and the
# sample CT's spleen needs 6.1 clicks instead of 2 to reach Dice 0.9), so one round each.
REFINE_ROUNDS = 1  # a lone click
CORRECTIVE_REFINE_ROUNDS = 1  # two or more clicks


def clicked_box(mask: np.ndarray, points: list[tuple[float, float, int]],
                margin: float = 0.0) -> tuple[float, float, float, float] | None:
    """Box (i0, j0, i1, j1) of the mask's connected parts under the positive clicks (else its largest
    part), widened by `margin` x its sides within the image; None for an empty mask."""
    parts, n = ndimage.label(mask)
    if n == 0:
        return None
    h, w = mask.shape
    clicked = {int(parts[min(max(int(round(y)), 0), h - 1), min(max(int(round(x)), 0), w - 1)])
               for x, y, label in points if label == 1} - {0}
    if not clicked:
        clicked = {int(np.argmax(np.bincount(parts.ravel())[1:])) + 1}
    rows, cols = np.nonzero(np.isin(parts, list(clicked)))
    di, dj = margin * (cols.max() - cols.min()), margin * (rows.max() - rows.min())
    return (float(max(cols.min() - di, 0)), float(max(rows.min() - dj, 0)),
            float(min(cols.max() + di, w - 1)), float(min(rows.max() + dj, h - 1)))
