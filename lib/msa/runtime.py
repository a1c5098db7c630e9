"""Where the image encoder runs: eager PyTorch, or the same graph compiled by OpenVINO.

On a CPU the encoder is what users wait for (about 2 s per 256 x 256 LiteMedSAM slice in eager
PyTorch on a 2-core machine). OpenVINO runs the same graph, adapters and depth branch included,
several times faster (`msa bench runtime`), with embeddings within 1e-5 of PyTorch's in fp32.

An export is one OpenVINO model (IR: .xml + .bin) of `images in [0, 255] -> embeddings` (or the
trunk of one block, for the feature store) at a fixed batch: 1 slice in 2D, one slab of `depth`
slices in 3D. It is named by the sha256 of everything it computes with (encoder weights, adapters,
pixel normalisation, graph, depth, OpenVINO version), written atomically under `export_dir` and
loaded from there by every later run. Precision is chosen when the export is compiled:

    fp32  exact (the default);
    bf16  where the CPU has bfloat16 instructions (OpenVINO reports BF16); refused elsewhere.

`background=True` (the server) builds exports in a thread: until one is ready, that graph runs in
PyTorch, so no request waits for an export.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .errors import MSAError
from .modeling.msa import MSA
from .names import PRECISIONS, RUNTIMES

logger = logging.getLogger(__name__)

KEEP_EXPORTS = 8  # about 30 MB each for LiteMedSAM
EXPORT_VERSION = 1  # bump when the exported graph changes (what is traced, how it is saved)
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def default_export_dir() -> Path:
    """$MSA_EXPORT_DIR, else $XDG_CACHE_HOME/msa/openvino (~/.cache/msa/openvino)."""
    if os.environ.get("MSA_EXPORT_DIR"):
        return Path(os.environ["MSA_EXPORT_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msa" / "openvino"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class TorchEncoder:
    """The model's own PyTorch forward: the reference, and the runtime on CUDA and for training."""

    name = "torch"
    precision = "fp32"

    def __init__(self, model: MSA) -> None:
        self.model = model

    def encode(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        return self.model.encode(images, depth)

    def block_input(self, images: torch.Tensor, block: int) -> torch.Tensor:
        return self.model.image_encoder.block_input(self.model.normalise(images), block)

    def prepare(self, depth: int = 1, block: int | None = None, background: bool = False) -> None:
        """Nothing to build: PyTorch runs the model as it is."""


class _Graph(torch.nn.Module):
    """What one export computes from images in [0, 255]: the embeddings, or the input of block `block`."""

    def __init__(self, model: MSA, depth: int, block: int | None) -> None:
        super().__init__()
        self.model, self.depth, self.block = model, depth, block

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return self.model.encode(images, self.depth)
        return self.model.image_encoder.block_input(self.model.normalise(images), self.block, self.depth)


class OpenVINOEncoder:
    """The encoder compiled by OpenVINO (CPU), one export per (graph, depth); PyTorch while one is built."""

    name = "openvino"

    def __init__(self, model: MSA, precision: str = "fp32", export_dir: str | Path | None = None,
                 background: bool = False) -> None:
        import openvino as ov

        if model.device.type != "cpu":
            raise MSAError(f"the openvino runtime runs on the CPU; the model is on {model.device} (use --runtime torch)")
        check_precision(precision)
        self.model = model
        self.precision = precision
        self.export_dir = Path(export_dir) if export_dir is not None else default_export_dir()
        self.background = background
        self.torch = TorchEncoder(model)
        self._core = ov.Core()
        self._compiled: dict[str, object] = {}  # export name -> compiled model
        self._building: dict[str, threading.Thread] = {}
        self._failed: dict[str, str] = {}  # export name -> why it failed
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"openvino-{self.precision}"

    def encode(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        depth = depth if self.model.config.three_d else 1
        return self._run(images, depth, None) if depth == images.shape[0] or depth == 1 else self.torch.encode(images, depth)

    def block_input(self, images: torch.Tensor, block: int) -> torch.Tensor:
        return self._run(images, 1, block)

    def prepare(self, depth: int = 1, block: int | None = None, background: bool = False) -> None:
        """Build or load the export of this graph now (benchmarks time the encoder, not the export), or
        start building it in a thread (a server, as its model is loaded)."""
        depth = depth if self.model.config.three_d else 1
        if self._get(depth, block, background) is None and not background:
            name = self._export_name(depth, block)
            raise MSAError(f"the openvino export of the encoder failed: {self._failed[name]} (use --runtime torch)")

    def ready(self, depth: int = 1, block: int | None = None) -> bool:
        """Whether the export for this graph is compiled (tests and the server's log ask)."""
        return self._export_name(depth, block) in self._compiled

    def wait(self) -> None:
        """Wait for the exports being built in the background."""
        for thread in list(self._building.values()):
            thread.join()

    def _run(self, images: torch.Tensor, depth: int, block: int | None) -> torch.Tensor:
        """Images (N, 3, S, S) -> outputs, `depth` slices per OpenVINO call (1 in 2D: the export's batch)."""
        compiled = self._get(depth, block, self.background)
        if compiled is None:  # being built in the background, or failed (logged): PyTorch answers
            return self.torch.encode(images, depth) if block is None else self.torch.block_input(images, block)
        request = compiled.create_infer_request()  # one per call: requests run concurrently
        outputs = []
        for start in range(0, images.shape[0], depth):
            request.infer([images[start:start + depth].detach().cpu().float().numpy()])
            outputs.append(torch.from_numpy(request.get_output_tensor(0).data.copy()))
        return torch.cat(outputs).to(images.device)

    def _get(self, depth: int, block: int | None, background: bool):
        """The compiled export, built (or loaded) now, or in a thread when `background` (None until ready)."""
        name = self._export_name(depth, block)
        with self._lock:
            if name in self._compiled or name in self._failed:
                return self._compiled.get(name)
            thread = self._building.get(name)
            if thread is None:
                thread = threading.Thread(target=self._build, args=(name, depth, block), daemon=True,
                                          name=f"openvino-export-{name[:12]}")
                self._building[name] = thread
                thread.start()
        if background:
            return None
        thread.join()
        return self._compiled.get(name)  # None: it failed (logged once), PyTorch answers

    def _build(self, name: str, depth: int, block: int | None) -> None:
        try:
            path = self.export_dir / name / "encoder.xml"
            if not path.is_file():
                self._export(path, depth, block)
            os.utime(path.parent)  # last used: what pruning keeps
            config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[self.precision]}
            compiled = self._core.compile_model(self._core.read_model(str(path)), "CPU", config)
            with self._lock:
                self._compiled[name] = compiled
            logger.info("openvino %s encoder ready (%s)", self.precision, path.parent)
            self._prune()
        except Exception as exc:  # noqa: BLE001 - PyTorch serves instead; said once
            logger.warning("openvino export %s failed; PyTorch runs that encoder graph: %s", name[:12], exc)
            with self._lock:
                self._failed[name] = " ".join(str(exc).split())[:300] or type(exc).__name__
        finally:
            with self._lock:
                self._building.pop(name, None)

    def _prune(self) -> None:
        """Keep the KEEP_EXPORTS most recently used exports: each retraining's adapters get their own."""
        folders = sorted((p for p in self.export_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[KEEP_EXPORTS:]:
            shutil.rmtree(old, ignore_errors=True)

    def _export(self, path: Path, depth: int, block: int | None) -> None:
        """Trace the graph with OpenVINO's PyTorch front end and save the model under `path`'s folder,
        atomically (a folder written beside it, then renamed): a reader never sees half an export."""
        import openvino as ov
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        # The front end directly, not ov.convert_model: that one sends usage telemetry by default.
        size = self.model.img_size
        example = torch.rand(depth, 3, size, size) * 255
        graph = _Graph(self.model, depth, block).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the batch is fixed on purpose
            decoder = TorchScriptPythonDecoder(graph, example_input=(example,), shared_memory=False)
            frontend = FrontEndManager().load_by_framework("pytorch")
            exported = frontend.convert(frontend.load(decoder))
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent.parent, prefix=f".{path.parent.name}."))
        try:
            ov.save_model(exported, str(staging / path.name), compress_to_fp16=False)
            try:
                os.rename(staging, path.parent)
            except OSError:
                if not path.is_file():  # not another process that finished first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _export_name(self, depth: int, block: int | None) -> str:
        import openvino as ov

        model = self.model
        digest = hashlib.sha256()
        weights = model.encoder_backbone_hash() if block is not None else model.encoder_key()
        for part in (EXPORT_VERSION, ov.__version__, model.config.backbone, model.config.three_d, weights,
                     depth, block, *model.config.pixel_mean, *model.config.pixel_std):
            digest.update(repr(part).encode())
        return digest.hexdigest()[:32]


def cpu_capabilities() -> list[str]:
    """What OpenVINO reports this CPU can run: FP32, BF16, INT8, ..."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_supported() -> bool:
    return openvino_available() and "BF16" in cpu_capabilities()


def check_precision(precision: str) -> None:
    """Refuse a precision this CPU cannot run, in one line."""
    if precision not in PRECISIONS:
        raise MSAError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported():
        raise MSAError(f"precision bf16: this CPU has no bfloat16 instructions (OpenVINO reports "
                       f"{', '.join(cpu_capabilities())}); use fp32")


def make_encoder(model: MSA, runtime: str = "auto", precision: str = "fp32", export_dir: str | Path | None = None,
                 background: bool = False) -> TorchEncoder | OpenVINOEncoder:
    """The encoder runtime for `model`. auto: OpenVINO on a CPU when installed, else PyTorch."""
    if runtime not in RUNTIMES:
        raise MSAError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime = "openvino" if model.device.type == "cpu" and openvino_available() else "torch"
    if runtime == "torch":
        if precision != "fp32":
            raise MSAError(f"precision {precision}: the torch runtime runs fp32 (use --runtime openvino)")
        return TorchEncoder(model)
    if not openvino_available():
        raise MSAError("runtime openvino: the openvino package is not installed (pip install openvino)")
    return OpenVINOEncoder(model, precision, export_dir, background)
