"""Adapter files the server meets after an upgrade (lib/models.py), against a real server.

A model_dir/msa_adapters.pt published by an older release (here: the shipped LiteMedSAM adapters
with the metadata of a file trained before adapter files named the decoder parts they train) no
longer fits the model. It used to make every infer answer 422. Now the server says so once, in
one warning naming the file and why, leaves the file where it is, and serves the base adapters;
the published file is checked again whenever it changes (a new training run replaces it).
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
from app_helpers import MAIN_ID, Server, Study, start_server, stop_server

from msa.modeling.build import default_adapters

WARNING = "do not fit"  # in the one warning line (lib/models.py)


@dataclass(frozen=True)
class Files:
    shipped: Path  # the base adapters of this server (the ones shipped with msa)
    old: Path  # the shipped adapters as a file from before the "decoder" metadata field: does not fit
    other: Path  # the shipped adapters re-saved with other metadata: fits, other bytes


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
    return Files(shipped, old_format_adapters(shipped, out / "old.pt"), out / "other.pt")


@pytest.fixture(scope="module")
def server(study: Study, files: Files, tmp_path_factory: pytest.TempPathFactory):
    """A server upgraded in place: its model_dir holds adapters an older release published."""
    tmp = tmp_path_factory.mktemp("server")
    studies, model_dir = tmp / "studies", tmp / "model"
    studies.mkdir()
    model_dir.mkdir()
    shutil.copy(files.old, model_dir / "msa_adapters.pt")
    running = start_server(tmp, studies, model_dir)
    answer = requests.put(f"{running.url}/datastore/image", params={"image": MAIN_ID}, timeout=120,
                          files={"file": ("x.nii.gz", study.image.read_bytes())})
    assert answer.status_code == 200, answer.text[:300]
    yield running
    stop_server(running)


def publish(server: Server, source: Path) -> Path:
    """What training does: a new file renamed onto the published one."""
    published = server.model_dir / "msa_adapters.pt"
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
    published = server.model_dir / "msa_adapters.pt"
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


def test_the_published_file_is_checked_again_when_it_changes(server: Server, study: Study, files: Files):
    published = publish(server, files.other)  # fits: it serves
    assert infer(server, study)["adapters_sha256"] == sha256(files.other)
    info = server.info()["msa"]
    assert (info["adapters"], info["adapters_sha256"]) == ("msa_adapters.pt", sha256(files.other)), info
    assert log_lines(server, "MSA: serving adapters", str(published)), server.log_tail(40)

    publish(server, files.old)  # does not fit: set aside again, the base adapters serve
    assert infer(server, study)["adapters_sha256"] == sha256(files.shipped)
    assert len(log_lines(server, WARNING, str(published))) == 2, server.log_tail(40)
    assert published.read_bytes() == files.old.read_bytes()
    assert server.info()["msa"]["adapters_sha256"] == sha256(files.shipped)
