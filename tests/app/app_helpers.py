"""Helpers for the MONAI Label app tests: start / stop a real `monailabel start_server`, read
HTTP statuses out of client errors, snapshot a folder byte by byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
APP_DIR = Path(os.environ.get("MSA_TEST_APP_DIR") or REPO / "monailabel_app")  # override: run the tests on a copy
# The `monailabel` launcher runs `python -m monailabel.main`: the venv's python must come first on PATH.
VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "monailabel").exists() else Path(sys.executable).parent
CROP = (11, 19)  # axial slices [11, 19) of ct_abdomen: 8 slices, spleen on every one
FRESH = (19, 23)  # 4 other slices: an image whose embeddings nobody has cached
SPLEEN = 1
MAIN_ID, FRESH_ID, COPY_ID = "ct_crop", "ct_fresh", "ct_crop_copy"  # image ids in the datastore
START_TIMEOUT = 120.0
# What training publishes in model_dir for the default server (lite_medsam, 2D), and its draft until a run ends.
PUBLISHED, DRAFT = "msa_adapters_lite_medsam_2d.pt", "msa_adapters_lite_medsam_2d.training.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # No scoring runs at start-up or after train / next_sample: they would eat the CPU.
    env["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
    env["MONAI_LABEL_SESSION_PATH"] = str(tmp / "sessions")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_config(tmp: Path) -> Path:
    """MONAI Label's own logging.json with the log file in tmp (by default it appends to
    <app>/logs/app.log, a file tracked in this repository)."""
    import monailabel

    text = (Path(monailabel.__file__).parent / "logging.json").read_text()
    text = text.replace("${LOGFILE}", str(tmp / "app.log")).replace("${LOGDIR}", str(tmp))
    path = tmp / "logging.json"
    path.write_text(text)
    return path


def start_command(studies: Path, port: int, conf: dict[str, str], tmp: Path) -> list[str]:
    cmd = ["monailabel", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--log_config", str(log_config(tmp))]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return cmd


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    studies: Path
    model_dir: Path
    output: Path  # the server's stdout + stderr
    tmp: Path

    def log_tail(self, n: int = 60) -> str:
        lines = self.output.read_text(errors="replace").splitlines() if self.output.exists() else []
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def info(self, timeout: float = 30) -> dict:
        response = requests.get(f"{self.url}/info/", timeout=timeout)
        assert response.status_code == 200, f"/info/ -> {response.status_code} {response.text[:300]}"
        return response.json()

    def wait_until_idle(self, timeout: float = 300) -> None:
        """No training subprocess running (GET /train/?check_if_running=true answers 404 then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(f"{self.url}/train/", params={"check_if_running": "true"}, timeout=30)
            if r.status_code != 200:
                return
            time.sleep(1)
        raise AssertionError(f"a training task still runs after {timeout} s\n{self.log_tail()}")


def start_isolated_server(tmp: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None,
                          studies_files: dict[str, Path] | None = None,
                          image_info: dict[str, dict] | None = None) -> Server:
    """A server in `tmp` with its own studies/ (holding copies of `studies_files`: name -> file) and
    its own TMP/ (`server.tmp / "TMP"`) as TMPDIR, so that tests see whatever it leaves behind.
    `image_info`: image id -> info written through MONAI Label's datastore before the server starts
    (it may hold keys that clients cannot write, as a server of an earlier run would have left them)."""
    studies, temp = tmp / "studies", tmp / "TMP"
    studies.mkdir()
    temp.mkdir()
    for name, path in (studies_files or {}).items():
        (studies / name).write_bytes(path.read_bytes())
    if image_info:
        from monailabel.datastore.local import LocalDatastore

        store = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=False)
        for image_id, info in image_info.items():
            store.update_image_info(image_id, info)
    return start_server(tmp, studies, tmp / "model", conf=conf, env={"TMPDIR": str(temp), **(env or {})})


def start_server(tmp: Path, studies: Path, model_dir: Path, conf: dict[str, str] | None = None,
                 env: dict[str, str] | None = None) -> Server:
    """`conf`: more --conf options; `env`: environment entries over server_env's (e.g. TMPDIR)."""
    port = free_port()
    output = tmp / "server.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            start_command(studies, port, {"model_dir": str(model_dir), **(conf or {})}, tmp),
            stdout=out, stderr=subprocess.STDOUT, env={**server_env(tmp), **(env or {})}, cwd=tmp,
            start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, studies, model_dir, output, tmp)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            pytest.fail(f"the server exited with {process.returncode} during start-up:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/info/", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(server)
    pytest.fail(f"the server did not answer /info/ within {START_TIMEOUT} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.alive():
        try:
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.process.wait(timeout=20)
    # Training subprocesses MONAI Label started share the process group; make sure none is left.
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_scores(server: Server, image_ids, model: str, tries: int = 600) -> dict[str, dict]:
    """Polls /datastore/image/info (at most `tries` times, 0.5 s apart) until every image has an
    `msa_confidence` score made by `model` (the serving adapters' sha256); image id -> score."""
    scores = {}
    for _ in range(tries):
        for image_id in image_ids:
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=30).json()
            if (info.get("msa_confidence") or {}).get("model") == model:
                scores[image_id] = info["msa_confidence"]
        if len(scores) == len(image_ids):
            return scores
        time.sleep(0.5)
    raise AssertionError(f"scores by {model[:12]} for {sorted(scores)} of {sorted(image_ids)} after {tries} tries"
                         f"\n{server.log_tail()}")


@dataclass(frozen=True)
class Study:
    image: Path  # the cropped CT (122 x 101 x 8)
    labels: Path  # the same crop of the full label map
    spleen: Path  # the crop's spleen mask (0/1, uint8) as a label file
    spleen_kji: np.ndarray  # (8, 101, 122) bool, sitk array order
    roi: list[int]  # [i0, i1, j0, j1, k0, k1] tight box of the spleen on the crop
    interior: list[int]  # [i, j, k] the spleen's interior-most voxel (distance transform)
    fresh: Path  # 4 other slices (19..22): nobody has their embeddings
    fresh_roi: list[int]
    wrong_size: Path  # a spleen label on the full 30-slice grid: wrong size for the crop
    garbage: Path  # random bytes named .nii.gz
    text: Path  # a text file named x.nii.gz


def status_of(exc: Exception) -> int | None:
    """The HTTP status in a MONAILabelClientException (its status_code is often left unset)."""
    code = getattr(exc, "status_code", None)
    if code:
        return int(code)
    found = re.search(r"Status: (\d{3})", str(getattr(exc, "msg", exc)))
    return int(found.group(1)) if found else None


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) -> its bytes; folders as empty markers."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            result[os.path.relpath(os.path.join(root, name), folder) + "/"] = b""
        for name in files:
            path = os.path.join(root, name)
            result[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return result


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sha256_tree(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> its sha256; folders as markers; symlinks by target."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            result[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                result[os.path.relpath(path, folder)] = "-> " + os.readlink(path)
            else:
                result[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return result


def files_under(folder: Path, skip: tuple[str, ...] = ()) -> set[str]:
    """Relative paths of everything under folder, except the top-level entries named in skip."""
    found = set()
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        if rel != "." and rel.split(os.sep)[0] in skip:
            continue
        for name in dirs + files:
            path = os.path.normpath(os.path.join(rel, name))
            if path.split(os.sep)[0] not in skip:
                found.add(path)
    return found
