"""The app's one model: built from the --conf options, reloaded when new adapters are published."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from msa import build_model
from msa.engine import Engine
from msa.errors import MSAError
from msa.modeling.build import BACKBONES, default_adapters

logger = logging.getLogger(__name__)


def conf_bool(conf: dict, key: str, default: bool) -> bool:
    """--conf values arrive as strings."""
    value = str(conf.get(key, default)).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise MSAError(f"--conf {key} {value!r}: use true or false")
    return value in ("true", "1", "yes")


class ModelProvider:
    """Owns the engine; infer, scoring and train tasks all ask it for the current one.

    Adapters: the file published by training (model_dir/msa_adapters.pt) when there is one, else
    the --conf adapters file, else the adapters shipped with msa for the backbone. The published
    file is checked on every request (its mtime); a new one is loaded into a fresh engine that
    shares the old engine's embedding cache (keyed by the encoder's weights, so nothing stale).
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
        self.model_dir = Path(model_dir)
        self.published = self.model_dir / "msa_adapters.pt"
        configured = conf.get("adapters") or None
        if configured and not Path(configured).is_file():
            raise MSAError(f"adapters file not found: {configured} (pass --conf adapters PATH to an msa adapter file)")
        self.base_adapters = Path(configured) if configured else default_adapters(self.backbone, self.three_d)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._loaded_stamp: tuple | None = None

    def adapters_path(self) -> Path | None:
        return self.published if self.published.is_file() else self.base_adapters

    def _stamp(self) -> tuple | None:
        path = self.adapters_path()
        if path is None:
            return None
        stat = os.stat(path)
        return str(path), stat.st_mtime_ns, stat.st_size

    def engine(self) -> Engine:
        with self._lock:
            stamp = self._stamp()
            if self._engine is None or stamp != self._loaded_stamp:
                adapters = self.adapters_path()
                logger.info(f"MSA: loading {self.backbone} with adapters {adapters}")
                model = build_model(self.backbone, checkpoint=self.checkpoint, adapters=adapters,
                                    three_d=self.three_d, device=self.device)
                cache = self._engine.cache if self._engine is not None else None
                self._engine = Engine(model, cache_bytes=self.cache_bytes, cache=cache)
                self._loaded_stamp = stamp
            return self._engine
