"""Every route the server answers, with the query parameters each takes, and what its body may be.

The request guard (lib/guard.py) finds a request's rule before any route code runs; a request that
matches no rule is refused (deny by default), so a route MONAI Label adds in a later release stays
closed until it is listed here. Routes this app does not serve (sessions, DICOMweb proxy, OHIF,
WSI and batch inference, model uploads, /reload) are listed with the reason they are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from msa.errors import MSAError

from .errors import MethodNotAllowed, NotFound
from .names import check_name, is_name

BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
CHECKSUM = re.compile(r"(?:(?:sha256|sha1|md5):)?[0-9a-f]{32,128}", re.IGNORECASE)


@dataclass(frozen=True)
class Param:
    """One query parameter: a name, a boolean, a bounded integer, one of a few words, a checksum,
    or text (taken as it is: the route's handler decides, e.g. a session_id it refuses)."""

    kind: str
    required: bool = False
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()

    def check(self, key: str, value: str) -> None:
        if self.kind == "name":
            check_name(value, key)
        elif self.kind == "bool" and value.lower() not in BOOLEANS:
            raise MSAError(f"query parameter {key}={value[:40]!r}: use true or false")
        elif self.kind == "int":
            if not re.fullmatch(r"[0-9]{1,10}", value) or not self.low <= int(value) <= self.high:
                raise MSAError(f"query parameter {key}={value[:40]!r}: give an integer in {self.low}..{self.high}")
        elif self.kind == "choice" and value not in self.choices:
            raise MSAError(f"query parameter {key}={value[:40]!r}: use one of {', '.join(self.choices)}")
        elif self.kind == "checksum" and not CHECKSUM.fullmatch(value):
            raise MSAError(f"query parameter {key}: give [sha256:]<hex digest>")


NAME, NAME_REQUIRED = Param("name"), Param("name", required=True)
BOOL = Param("bool")


@dataclass(frozen=True)
class Rule:
    method: str
    template: str  # "/infer/{model}": {x} is one path segment, a name; {x:path} is anything
    query: dict[str, Param] = field(default_factory=dict)
    body: str = "none"  # none | form (small JSON or form) | upload (multipart with a file)
    refused: tuple[Callable[[str], MSAError], str] | None = None
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+):path\}", r"(?P<\1>.*)", self.template)
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
        object.__setattr__(self, "pattern", re.compile("^" + regex.rstrip("/") + "/?$"))

    def check_path(self, groups: dict[str, str]) -> None:
        for key, value in groups.items():
            if not self.template.count(f"{{{key}:path}}") and not is_name(value):
                raise NotFound(f"no {key} {unquote(value)[:60]!r} here ({key}s are names)")


# Refused routes: (the error raised, its message).
NO_SESSIONS = (NotFound, ("sessions are not used by this app: upload the image with PUT /datastore/image "
                          "and infer with ?image=<id>"))
NO_DICOMWEB = (NotFound, "this server has a local datastore: no DICOMweb proxy, no OHIF viewer")
NO_WSI = (NotFound, "whole-slide (WSI) inference is not served by this app")
NO_BATCH = (MethodNotAllowed, ("batch inference is not served by this app (it would run every image "
                               "through the model); infer one image at a time"))
NO_MODEL_UPLOAD = (MethodNotAllowed, ("model files are not uploaded or deleted over HTTP: training "
                                      "publishes adapters; restart with --conf adapters FILE to use others"))
NO_RELOAD = (NotFound, "reloading the app over HTTP is not served (restart the server)")
NO_GPU_INFO = (NotFound, "GPU information is not served")

OUTPUT_INFER = Param("choice", choices=("image", "json", "all", "dicom_seg"))

RULES: tuple[Rule, ...] = (
    Rule("GET", "/info/"),
    Rule("GET", "/"),
    Rule("GET", "/docs"),
    Rule("GET", "/openapi.json"),
    Rule("GET", "/favicon.ico"),
    Rule("GET", "/static/{path:path}"),
    # datastore
    Rule("GET", "/datastore/", {"output": Param("choice", choices=("all", "train", "stats"))}),
    Rule("PUT", "/datastore/image", {"image": NAME}, body="upload"),
    Rule("PUT", "/datastore/", {"image": NAME}, body="upload"),
    Rule("DELETE", "/datastore/image", {"id": NAME_REQUIRED}),
    Rule("DELETE", "/datastore/", {"id": NAME_REQUIRED}),
    Rule("HEAD", "/datastore/image", {"image": NAME_REQUIRED, "check_sum": Param("checksum")}),
    Rule("GET", "/datastore/image", {"image": NAME_REQUIRED}),
    Rule("GET", "/datastore/image/info", {"image": NAME_REQUIRED}),
    Rule("PUT", "/datastore/image/info", {"image": NAME_REQUIRED}, body="form"),
    Rule("PUT", "/datastore/label", {"image": NAME_REQUIRED, "tag": NAME}, body="upload"),
    Rule("DELETE", "/datastore/label", {"id": NAME_REQUIRED, "tag": NAME_REQUIRED}),
    Rule("HEAD", "/datastore/label", {"image": NAME_REQUIRED, "tag": NAME_REQUIRED}),
    Rule("GET", "/datastore/label", {"label": NAME_REQUIRED, "tag": NAME_REQUIRED}),
    Rule("GET", "/datastore/label/info", {"label": NAME_REQUIRED, "tag": NAME_REQUIRED}),
    Rule("PUT", "/datastore/label/info", {"label": NAME_REQUIRED, "tag": NAME_REQUIRED}, body="form"),
    Rule("PUT", "/datastore/updatelabelinfo", {"label": NAME_REQUIRED, "tag": NAME_REQUIRED}, body="form"),
    Rule("GET", "/datastore/dataset", {"limit_cases": Param("int", low=1, high=1_000_000)}),
    # models
    Rule("GET", "/model/{model}"),
    Rule("GET", "/model/info/{model}"),
    Rule("PUT", "/model/{model}", refused=NO_MODEL_UPLOAD),
    Rule("DELETE", "/model/{model}", refused=NO_MODEL_UPLOAD),
    # inference: datastore ids only (no file upload, no session)
    Rule("POST", "/infer/wsi/{model}", refused=NO_WSI),
    Rule("POST", "/infer/wsi_v2/{model}", refused=NO_WSI),
    Rule("POST", "/infer/{model}", {"image": NAME_REQUIRED, "output": OUTPUT_INFER, "session_id": Param("text")},
         body="form"),
    Rule("GET", "/batch/infer", {"all": BOOL, "check_if_running": BOOL}),
    Rule("POST", "/batch/infer/{model}", refused=NO_BATCH),
    Rule("DELETE", "/batch/infer", refused=NO_BATCH),
    # training, active learning, scoring
    Rule("GET", "/train/", {"all": BOOL, "check_if_running": BOOL}),
    Rule("POST", "/train/", {"run_sync": BOOL}, body="form"),
    Rule("POST", "/train/{model}", {"run_sync": BOOL, "enqueue": BOOL}, body="form"),
    Rule("DELETE", "/train/"),
    Rule("POST", "/activelearning/{strategy}", body="form"),
    Rule("GET", "/scoring/", {"all": BOOL, "check_if_running": BOOL}),
    Rule("POST", "/scoring/", {"run_sync": BOOL}, body="form"),
    Rule("POST", "/scoring/{method}", {"run_sync": BOOL}, body="form"),
    Rule("DELETE", "/scoring/"),
    # the rest of MONAI Label
    Rule("GET", "/logs/", {"lines": Param("int", low=0, high=1_000_000), "html": BOOL, "text": BOOL,
                           "refresh": Param("int", low=0, high=86_400)}),
    Rule("GET", "/logs/gpu", refused=NO_GPU_INFO),
    Rule("POST", "/reload", refused=NO_RELOAD),
    *(Rule(method, "/session/{rest:path}", refused=NO_SESSIONS) for method in ("GET", "PUT", "DELETE")),
    *(Rule(method, f"/{prefix}/{{rest:path}}", refused=NO_DICOMWEB)
      for prefix in ("proxy", "ohif") for method in ("GET", "POST")),
)


def find_rule(method: str, path: str) -> tuple[Rule, dict[str, str]]:
    """The rule for a request, with its path parameters; NotFound / MethodNotAllowed if none."""
    path_known = False
    for rule in RULES:
        match = rule.pattern.match(path)
        if match is None:
            continue
        if rule.method == method:
            return rule, match.groupdict()
        path_known = True
    if path_known:
        raise MethodNotAllowed(f"{method} is not allowed on {path[:100]}")
    raise NotFound(f"no route {path[:100]}")
