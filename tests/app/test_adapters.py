"""Adapter files the server meets after an upgrade (lib/models.py), against real servers.

Training publishes model_dir/msa_adapters_<backbone>_<2d|3d>.pt: a server started with another
backbone or three_d has its own file and never meets another's. One published by an older release
(here: the shipped LiteMedSAM adapters with the metadata of a file trained before adapter files
named the decoder parts they train) may still not fit the model. It used to make every infer answer
422. Now the server says so once, in one warning naming the file and why, leaves the file where it
is, and serves the base adapters; the published file is checked again whenever it changes (a new
training run replaces it). The one model_dir/msa_adapters.pt of releases before the names were
keyed is never served, whatever it holds: one warning names it and says how to serve it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from app_helpers import MAIN_ID, PUBLISHED, Server, Study, start_server, stop_server

import msa
from msa.modeling.build import default_adapters

WARNING = "do not fit"  # in the one warning line (lib/models.py)
LEGACY = "msa_adapters.pt"  # the one published file of earlier releases, for every backbone and mode
LEGACY_WARNING = "is not served"


@dataclass(frozen=True)
class Files:
    shipped: Path  # the base adapters of this server (the ones shipped with msa)
    old: Path  # the shipped adapters as a file from before the "decoder" metadata field: does not fit
    other: Path  # the shipped adapters re-saved with other metadata: fits, other bytes
    tiny_backbone: Path  # a vit_tiny backbone (random weights) as a checkpoint file
    tiny: Path  # adapters for that vit_tiny (2D)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def old_format_adapters(shipped: Path, out: Path) -> Path:
    payload = torch.load(shipped, map_location="cpu", weights_only=True)
    assert payload["metadata"].get("decoder") == "head", payload["metadata"]  # what this test is about
    del payload["metadata"]["decoder"]
    torch.save(payload, out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    out = tmp_path_factory.mktemp("adapter-files")
    shipped = default_adapters("lite_medsam")
    assert shipped is not None and shipped.is_file()
    payload = torch.load(shipped, map_location="cpu", weights_only=True)
    payload["metadata"]["extra"] = {"note": "a valid file with other bytes"}
    torch.save(payload, out / "other.pt")
    torch.manual_seed(0)
    tiny = msa.build_model("vit_tiny", pretrained=False)
    torch.save({k: v for k, v in tiny.state_dict().items() if "_adapter." not in k}, out / "vit_tiny.pth")
    msa.save_adapters(tiny, out / "vit_tiny_adapters.pt")
    return Files(shipped, old_format_adapters(shipped, out / "old.pt"), out / "other.pt", out / "vit_tiny.pth",
                 out / "vit_tiny_adapters.pt")


@pytest.fixture(scope="module")
def server(study: Study, files: Files, tmp_path_factory: pytest.TempPathFactory):
    """A server upgraded in place: its model_dir holds adapters an older release published for
    this backbone and mode, and the one file of the releases before published files were keyed
    (adapters that fit: the server would have served them)."""
    tmp = tmp_path_factory.mktemp("server")
    studies, model_dir = tmp / "studies", tmp / "model"
    studies.mkdir()
    model_dir.mkdir()
    shutil.copy(files.old, model_dir / PUBLISHED)
    shutil.copy(files.other, model_dir / LEGACY)
    running = start_server(tmp, studies, model_dir)
    answer = requests.put(f"{running.url}/datastore/image", params={"image": MAIN_ID}, timeout=120,
                          files={"file": ("x.nii.gz", study.image.read_bytes())})
    assert answer.status_code == 200, answer.text[:300]
    yield running
    stop_server(running)


def publish(server: Server, source: Path) -> Path:
    """What training does: a new file renamed onto the published one."""
    published = server.model_dir / PUBLISHED
    staged = server.model_dir / ".incoming.pt"
    shutil.copy(source, staged)
    os.replace(staged, published)
    return published


def infer(server: Server, study: Study) -> dict:
    answer = requests.post(f"{server.url}/infer/msa_2d", params={"image": MAIN_ID, "output": "json"},
                           data={"params": json.dumps({"foreground": [study.interior]})}, timeout=600)
    assert answer.status_code == 200, f"{answer.status_code} {answer.text[:400]}\n{server.log_tail(30)}"
    return answer.json()


def log_lines(server: Server, *parts: str) -> list[str]:
    return [line for line in server.output.read_text(errors="replace").splitlines() if all(p in line for p in parts)]


def test_published_adapters_that_do_not_fit_are_set_aside_with_one_warning(server: Server, study: Study, files: Files):
    published = server.model_dir / PUBLISHED
    # Checked when the server started, before any request: one warning naming the file and why.
    warnings = log_lines(server, WARNING, str(published))
    assert len(warnings) == 1, warnings or server.log_tail(40)
    assert "decoder" in warnings[0] and str(files.shipped) in warnings[0], warnings[0]
    info = server.info()["msa"]
    assert (info["adapters"], info["adapters_sha256"]) == (files.shipped.name, sha256(files.shipped)), info

    for _ in range(2):  # every request is served, by the base adapters; still one warning
        assert infer(server, study)["adapters_sha256"] == sha256(files.shipped)
    assert len(log_lines(server, WARNING, str(published))) == 1
    assert published.read_bytes() == files.old.read_bytes(), "the user's file was changed or removed"
    assert log_lines(server, "MSA: serving adapters", str(files.shipped)), server.log_tail(40)


def test_the_unkeyed_file_of_earlier_releases_is_not_served_and_one_warning_says_how_to(server: Server,
                                                                                        files: Files):
    legacy = server.model_dir / LEGACY
    warnings = log_lines(server, LEGACY_WARNING, str(legacy))
    assert len(warnings) == 1, warnings or server.log_tail(40)
    assert f"--conf adapters {legacy}" in warnings[0] and PUBLISHED in warnings[0], warnings[0]
    assert server.info()["msa"]["adapters"] != LEGACY
    assert legacy.read_bytes() == files.other.read_bytes(), "the user's file was changed or removed"


def test_the_published_file_is_checked_again_when_it_changes(server: Server, study: Study, files: Files):
    published = publish(server, files.other)  # fits: it serves
    assert infer(server, study)["adapters_sha256"] == sha256(files.other)
    info = server.info()["msa"]
    assert (info["adapters"], info["adapters_sha256"]) == (PUBLISHED, sha256(files.other)), info
    assert log_lines(server, "MSA: serving adapters", str(published)), server.log_tail(40)

    publish(server, files.old)  # does not fit: set aside again, the base adapters serve
    assert infer(server, study)["adapters_sha256"] == sha256(files.shipped)
    assert len(log_lines(server, WARNING, str(published))) == 2, server.log_tail(40)
    assert published.read_bytes() == files.old.read_bytes()
    assert server.info()["msa"]["adapters_sha256"] == sha256(files.shipped)


def test_a_server_with_another_backbone_serves_its_own_published_file(study: Study, files: Files,
                                                                       tmp_path_factory: pytest.TempPathFactory):
    """A vit_tiny server on a model_dir where a lite_medsam server published 2D adapters (and an
    earlier release left its one file): it serves the file published for vit_tiny 2D, and neither
    other file makes it warn that adapters do not fit."""
    tmp = tmp_path_factory.mktemp("vit-tiny-server")
    studies, model_dir = tmp / "studies", tmp / "model"
    studies.mkdir()
    model_dir.mkdir()
    shutil.copy(files.other, model_dir / PUBLISHED)  # lite_medsam 2D's
    shutil.copy(files.other, model_dir / LEGACY)
    own = model_dir / "msa_adapters_vit_tiny_2d.pt"
    shutil.copy(files.tiny, own)
    running = start_server(tmp, studies, model_dir, conf={"backbone": "vit_tiny", "checkpoint": str(files.tiny_backbone),
                                                          "runtime": "torch"})
    try:
        info = running.info()["msa"]
        assert (info["backbone"], info["adapters"], info["adapters_sha256"]) == ("vit_tiny", own.name, sha256(own)), info
        assert log_lines(running, "MSA: serving adapters", str(own)), running.log_tail(40)
        assert not log_lines(running, WARNING), running.log_tail(40)
        assert len(log_lines(running, LEGACY_WARNING, str(model_dir / LEGACY))) == 1, running.log_tail(40)
        answer = requests.put(f"{running.url}/datastore/image", params={"image": MAIN_ID}, timeout=120,
                              files={"file": ("x.nii.gz", study.image.read_bytes())})
        assert answer.status_code == 200, answer.text[:300]
        assert infer(running, study)["adapters_sha256"] == sha256(own)
        assert (model_dir / PUBLISHED).read_bytes() == files.other.read_bytes()
    finally:
        stop_server(running)
