"""HTTP client for the MSA MONAI Label server, standard library only (Slicer's Python has neither
`monailabel` nor `requests`).

Every failure becomes one `MSAClientError` whose message says what happened and what to do: server
down, wrong URL, not a MONAI Label server, no MSA model, or the server's own 4xx message.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from . import multipart
from .errors import MSAClientError

DEFAULT_URL = "http://127.0.0.1:8000"
MSA_MODELS = ("msa", "msa_2d")  # 3D (propagates through the volume) and 2D (one slice)
START_HINT = "start it with `make demo` (or `monailabel start_server --app monailabel_app ...`)"


@dataclass
class InferAnswer:
    """One infer result: the label file's bytes (on the uploaded image's voxel grid) and the params."""

    label: bytes
    filename: str
    params: dict
    seconds: float  # round trip seen by the client, upload excluded


@dataclass
class RequestRecord:
    method: str
    path: str  # without the query
    status: int | None


def _detail(body: bytes) -> str:
    """The message of a FastAPI error answer ({"detail": str | [{"msg": ...}, ...]})."""
    try:
        detail = json.loads(body.decode("utf-8", "replace")).get("detail")
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:200] if text else "no message"
    if isinstance(detail, list):  # request validation errors
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
                         for d in detail)
    return str(detail)


@dataclass
class MSAClient:
    """Talks to one server. `log` records every request made (method, path, status), newest last."""

    url: str = DEFAULT_URL
    timeout: float = 30.0  # info, datastore
    infer_timeout: float = 900.0  # the first request on an image encodes its slices: minutes on a CPU
    log: list[RequestRecord] = field(default_factory=list)
    # Names this Slicer to the server, which keeps one interactive session per client, image and label:
    # a click then costs only what it changes. Two Slicers on one server must not share sessions.
    client_id: str = field(default_factory=lambda: f"msa-slicer-{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        url = (self.url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise MSAClientError(f"{self.url!r} is not a server URL; use one like {DEFAULT_URL}")
        self.url = url
        # A proxy configured for the internet must not swallow requests to this machine.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- transport -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, query: dict | None = None, body: bytes | None = None,
                 content_type: str | None = None, timeout: float | None = None, what: str = "the request",
                 ok_statuses: tuple[int, ...] = ()) -> tuple[int, dict, bytes]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        record = RequestRecord(method, path, None)
        self.log.append(record)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                record.status = response.status
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as exc:
            record.status = exc.code
            data = exc.read() if exc.fp else b""
            if exc.code in ok_statuses:
                return exc.code, dict(exc.headers.items()), data
            raise MSAClientError(f"the MSA server refused {what}: {_detail(data)} (HTTP {exc.code})",
                                 exc.code) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                raise MSAClientError(f"no MSA server answers at {self.url} (connection refused): "
                                     f"is it running? {START_HINT}") from None
            if isinstance(reason, socket.gaierror):
                raise MSAClientError(f"the server address in {self.url} cannot be resolved: check the URL") from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise MSAClientError(f"the MSA server at {self.url} did not answer {what} within "
                                     f"{timeout or self.timeout:.0f} s") from None
            raise MSAClientError(f"cannot reach the MSA server at {self.url}: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise MSAClientError(f"the MSA server at {self.url} did not answer {what} within "
                                 f"{timeout or self.timeout:.0f} s") from None
        except (ConnectionError, OSError) as exc:  # reset, broken pipe mid-answer
            raise MSAClientError(f"the connection to {self.url} broke during {what}: {exc}") from None

    def _json(self, data: bytes, what: str) -> dict:
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise MSAClientError(f"{self.url} answered {what} with something that is not JSON: "
                                 f"is this the MSA server? {START_HINT}") from None
        return value

    # -- server --------------------------------------------------------------------------------

    def info(self) -> dict:
        """GET /info/: the app's models, strategies, trainers, train_stats (and `msa`: backbone, adapters)."""
        try:
            _, _, data = self._request("GET", "/info/", what="GET /info/")
        except MSAClientError as exc:
            if exc.status == 404:
                raise MSAClientError(f"{self.url} is not a MONAI Label server (GET /info/ answered 404): "
                                     f"check the URL", 404) from None
            raise
        info = self._json(data, "GET /info/")
        if not isinstance(info, dict) or not isinstance(info.get("models"), dict):
            raise MSAClientError(f"{self.url} is not a MONAI Label server (its /info/ lists no models)")
        return info

    def msa_models(self, info: dict | None = None) -> list[str]:
        """The server's MSA infer models (`msa`, `msa_2d`); an MSAClientError when there is none."""
        info = info if info is not None else self.info()
        models = [name for name in MSA_MODELS if name in info["models"]]
        if not models:
            served = ", ".join(info["models"]) or "none"
            raise MSAClientError(f"the server at {self.url} has no MSA model (it serves: {served}); {START_HINT}")
        return models

    # -- datastore -----------------------------------------------------------------------------

    def image_exists(self, image_id: str) -> bool:
        status, _, _ = self._request("HEAD", "/datastore/image", {"image": image_id},
                                     what=f"the look-up of image {image_id!r}", ok_statuses=(404,))
        return status == 200

    def upload_image(self, image_id: str, filename: str, content: bytes) -> str:
        """PUT /datastore/image: the image under `image_id`; returns the id the server stored."""
        body, content_type = multipart.encode({"params": "{}"}, {"file": (filename, content)})
        _, _, data = self._request("PUT", "/datastore/image", {"image": image_id}, body, content_type,
                                   timeout=max(self.timeout, 300.0), what=f"the upload of image {image_id!r}")
        return str(self._json(data, "the upload").get("image", image_id))

    def download_image(self, image_id: str) -> tuple[str, bytes]:
        """GET /datastore/image -> (file name, bytes)."""
        _, headers, data = self._request("GET", "/datastore/image", {"image": image_id},
                                         timeout=max(self.timeout, 300.0), what=f"the download of image {image_id!r}")
        disposition = headers.get("content-disposition") or headers.get("Content-Disposition") or ""
        name = disposition.split("filename=")[-1].strip('"; ') if "filename=" in disposition else f"{image_id}.nii.gz"
        return name, data

    def save_label(self, image_id: str, filename: str, content: bytes, tag: str = "final") -> dict:
        """PUT /datastore/label: a label map on the image's voxel grid as the image's `tag` label."""
        body, content_type = multipart.encode({"params": "{}"}, {"label": (filename, content)})
        _, _, data = self._request("PUT", "/datastore/label", {"image": image_id, "tag": tag}, body, content_type,
                                   timeout=max(self.timeout, 300.0), what=f"the label of image {image_id!r}")
        return self._json(data, "the label upload")

    # -- infer, active learning, training -------------------------------------------------------

    def infer(self, model: str, image_id: str, params: dict) -> InferAnswer:
        """POST /infer/{model}: prompts in voxel indices of the stored image -> label file + params."""
        body, content_type = multipart.encode({"params": json.dumps({**params, "client_id": self.client_id})}, {})
        started = time.perf_counter()
        _, headers, data = self._request("POST", f"/infer/{urllib.parse.quote(model)}",
                                         {"image": image_id, "output": "all"}, body, content_type,
                                         timeout=self.infer_timeout, what=f"the {model} request")
        seconds = time.perf_counter() - started
        answer_type = headers.get("content-type") or headers.get("Content-Type") or ""
        if not answer_type.startswith("multipart/"):
            raise MSAClientError(f"the {model} request gave no label file (the server answered {answer_type or 'nothing'})")
        try:
            parts = multipart.decode(data, answer_type)
        except ValueError as exc:
            raise MSAClientError(f"the {model} answer cannot be read: {exc}") from None
        if "image" not in parts:
            raise MSAClientError(f"the {model} answer holds no label file")
        filename, label = parts["image"]
        params_bytes = parts.get("params", (None, b"{}"))[1]
        return InferAnswer(label, filename or "result", self._json(params_bytes, f"the {model} request"), seconds)

    def next_sample(self, strategy: str) -> dict:
        """POST /activelearning/{strategy}: the next image to label ({} when every image is labelled)."""
        _, _, data = self._request("POST", f"/activelearning/{urllib.parse.quote(strategy)}", body=b"{}",
                                   content_type="application/json", what=f"next sample ({strategy})")
        return self._json(data, "next sample")

    def train(self, model: str = "msa", params: dict | None = None) -> dict:
        """POST /train/{model}: starts the train task in the background."""
        _, _, data = self._request("POST", f"/train/{urllib.parse.quote(model)}", body=json.dumps(params or {}).encode(),
                                   content_type="application/json", what="the training request")
        return self._json(data, "the training request")

    def train_stats(self, model: str = "msa") -> dict:
        """The last run's record from /info/ (status RUNNING / DONE / FAILED / STOPPED, step, Dice)."""
        return self.info().get("train_stats", {}).get(model, {}) or {}

    def stop_training(self) -> dict:
        _, _, data = self._request("DELETE", "/train/", what="stopping the training")
        return self._json(data, "stopping the training")
