"""The app's one model: built from the --conf options when the server starts, rebuilt when training
publishes new adapters."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from msa import build_model, load_adapters
from msa.engine import Engine
from msa.errors import MSAError
from msa.modeling.build import BACKBONES, default_adapters
from msa.modeling.msa import MSA
from msa.runtime import make_encoder

logger = logging.getLogger(__name__)
LEGACY_PUBLISHED = "msa_adapters.pt"  # before published files were named by backbone and mode


def published_name(backbone: str, three_d: bool) -> str:
    """The file training publishes in model_dir for one backbone and mode: msa_adapters_lite_medsam_2d.pt."""
    return f"msa_adapters_{backbone}_{'3d' if three_d else '2d'}.pt"


def conf_bool(conf: dict, key: str, default: bool) -> bool:
    """--conf values arrive as strings."""
    value = str(conf.get(key, default)).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise MSAError(f"--conf {key} {value!r}: use true or false")
    return value in ("true", "1", "yes")


def _file_stamp(path: Path | None) -> tuple | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, MSAError) and text else f"{type(error).__name__}: {text}"


class ModelProvider:
    """Owns the engine; infer, scoring and train tasks all ask it for the current one.

    Adapters: the base adapters (the --conf adapters file, else the adapters shipped with msa for the
    backbone and mode) are loaded first: a base file that does not fit is an error, and the server
    does not start (`engine()` is called at start-up). Then the file published by training for this
    backbone and mode (model_dir/msa_adapters_<backbone>_<2d|3d>.pt), when there is one and it fits:
    one that does not (an older format, other backbone weights) is reported in one warning and left
    where it is, and the base adapters serve. Servers started with another backbone or three_d use
    their own file (by backbone name: two vit_b servers with other checkpoints need their own
    model_dir). A model_dir/msa_adapters.pt left by a release that kept one file for every backbone
    and mode becomes this server's published file when it has none and that one fits
    (_adopt_legacy); else it is not served, with one warning. The published file is checked on every
    request (its mtime and size); a new one is loaded into a fresh engine that shares the old
    engine's embedding cache (keyed by the encoder's weights, so nothing stale).
    """

    def __init__(self, conf: dict, model_dir: Path) -> None:
        self.backbone = conf.get("backbone", "lite_medsam")
        if self.backbone not in BACKBONES:
            raise MSAError(f"--conf backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        self.checkpoint = conf.get("checkpoint") or None
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise MSAError(f"checkpoint file not found: {self.checkpoint} (download the official "
                           f"{self.backbone} checkpoint and put it there, or pass --conf checkpoint PATH)")
        self.three_d = conf_bool(conf, "three_d", False)
        self.device = conf.get("device") or None
        self.cache_bytes = int(float(conf.get("cache_mb", 2048)) * 2**20)
        self.runtime = conf.get("runtime", "auto")  # checked when the model is built, at start-up
        self.precision = conf.get("precision", "fp32")
        self.model_dir = Path(model_dir)
        # OpenVINO exports: --conf export_dir, else $MSA_EXPORT_DIR (shared by servers on one machine), else
        # the app's model folder.
        self.export_dir = Path(conf.get("export_dir") or os.environ.get("MSA_EXPORT_DIR") or self.model_dir / "openvino")
        self.published = self.model_dir / published_name(self.backbone, self.three_d)
        self.draft = self.published.with_suffix(".training.pt")  # what training writes until it ends
        self.legacy = self.model_dir / LEGACY_PUBLISHED  # an earlier release's one file for all: not served
        configured = conf.get("adapters") or None
        if configured and not Path(configured).is_file():
            raise MSAError(f"adapters file not found: {configured} (pass --conf adapters PATH to an msa adapter file)")
        self.base_adapters = Path(configured) if configured else default_adapters(self.backbone, self.three_d)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._current: tuple[Engine, Path | None] | None = None  # the engine and its adapter file, as one
        self._loaded_stamp: tuple | None = None

    @property
    def mode(self) -> str:
        return "3D" if self.three_d else "2D"

    def build(self) -> tuple[MSA, Path | None]:
        """A model with the adapters to serve, and that file: the published one if it fits, else the
        base adapters. MSAError if the backbone or the base adapters cannot be loaded."""
        model = build_model(self.backbone, checkpoint=self.checkpoint, three_d=self.three_d)
        served = self.base_adapters
        if served is not None:
            try:
                # No 3D file ships yet: the 2D one serves a 3D model, and load_adapters warns that the
                # depth branch then adds nothing (a 3D server answers as 2D, and says so).
                load_adapters(model, served, allow_2d=self.three_d)
            except Exception as error:
                raise MSAError(f"the base adapters do not fit {self.backbone} ({self.mode}): {_one_line(error)}"
                               ) from None
        if self.published.is_file():
            problem = self._load_published(model)
            if problem is None:
                served = self.published
            else:
                logger.warning(f"MSA: the published adapters {self.published} do not fit {self.backbone} "
                               f"({self.mode}): {problem}. Serving the base adapters "
                               f"{self.base_adapters or '(none)'} instead; the file is left as it is (train "
                               f"again to replace it, or remove it)")
        if self.device is not None:
            model.to(self.device)
        return model, served

    def _load_published(self, model: MSA) -> str | None:
        """Load the published file into `model`; on any failure put the model back as it was and
        say why in one line (the file is a user's: an old format, another backbone, damaged)."""
        before = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        meta, targets = model.adapters_meta, model.targets
        try:
            load_adapters(model, self.published)
            return None
        except Exception as error:
            model.set_targets(targets)  # (the tokens themselves come back with the other tensors)
            model.load_state_dict(before, strict=False)
            model.adapters_meta = meta
            return _one_line(error).replace(f"{self.published}: ", "").replace(f"{self.published} ", "")

    def _stamp(self) -> tuple:
        return _file_stamp(self.published), _file_stamp(self.base_adapters)

    def _adopt_legacy(self) -> None:
        """An earlier release published one model_dir/msa_adapters.pt for every backbone and mode. When this
        server has no published file of its own yet and that one fits it, it becomes this server's file
        (renamed, so the active learning it holds is kept); else it is left alone, with one warning."""
        if not self.legacy.is_file() or (self.base_adapters is not None and self.legacy.samefile(self.base_adapters)):
            return
        if not self.published.exists():
            try:
                load_adapters(build_model(self.backbone, checkpoint=self.checkpoint, three_d=self.three_d), self.legacy)
            except Exception as error:
                logger.info(f"MSA: {self.legacy} does not fit {self.backbone} ({self.mode}): {_one_line(error)}")
            else:
                os.replace(self.legacy, self.published)
                logger.warning(f"MSA: {self.legacy} (published by an earlier release) fits {self.backbone} "
                               f"({self.mode}): renamed to {self.published}, this server's published adapters")
                return
        logger.warning(f"MSA: {self.legacy} is not served: published adapters are kept per backbone and mode "
                       f"(this server: {self.published.name}). To serve that file, start the server with "
                       f"--conf adapters {self.legacy}")

    def engine(self) -> Engine:
        with self._lock:
            stamp = self._stamp()
            if self._engine is None:
                self._adopt_legacy()
            if self._engine is None or stamp != self._loaded_stamp:
                logger.info(f"MSA: loading {self.backbone} ({self.mode})")
                model, served = self.build()
                cache = self._engine.cache if self._engine is not None else None
                # OpenVINO exports are built in a thread, off the request path (PyTorch answers until then),
                # and kept in the app's model folder, one per adapter file (msa.runtime).
                encoder = make_encoder(model, self.runtime, self.precision, export_dir=self.export_dir,
                                       background=True)
                self._engine = Engine(model, cache_bytes=self.cache_bytes, cache=cache, encoder=encoder)
                encoder.prepare(self._engine.slab_depth, background=True)
                self._current, self._loaded_stamp = (self._engine, served), stamp
                sha = (model.adapters_meta or {}).get("sha256")
                logger.info(f"MSA: serving adapters {served or '(none: the bare backbone)'}"
                            + (f" (sha256 {sha[:12]})" if sha else "") + f", encoder runtime {self._engine.runtime_label}")
            return self._engine

    def targets(self) -> list[str]:
        """The structure names the current adapters learnt as target prompts (none before a model is loaded)."""
        current = self._current
        return list(current[0].model.targets) if current is not None else []

    def served(self) -> tuple[Path | None, str | None]:
        """The adapter file the current engine holds and its sha256 (as loaded). Loads nothing and
        takes no lock: /info/ runs on the event loop and must not wait for a model being built."""
        current = self._current
        meta = current[0].model.adapters_meta if current is not None else None
        return (current[1], meta.get("sha256")) if meta else (None, None)
