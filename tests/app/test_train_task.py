"""The app's train task called in-process on a real LocalDatastore: what /info/'s train_stats reports
when a run fails, and for a run whose process is gone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import psutil
import pytest
from app_helpers import APP_DIR, DRAFT, MAIN_ID, PUBLISHED


@pytest.fixture(scope="module")
def app_lib():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.models import ModelProvider
        from lib.trainers import MSATrain

        yield ModelProvider, MSATrain
    finally:
        sys.path.remove(str(APP_DIR))


def test_a_failed_run_reports_failed_and_publishes_nothing(app_lib, study, tmp_path):
    import SimpleITK as sitk
    from monailabel.datastore.local import LocalDatastore
    from msa.errors import MSAError

    ModelProvider, MSATrain = app_lib
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(study.image, studies / f"{MAIN_ID}.nii.gz")
    datastore = LocalDatastore(str(studies))
    empty = sitk.ReadImage(str(study.spleen)) * 0  # a final label with nothing in it: no training samples
    empty_path = tmp_path / "empty.nii.gz"
    sitk.WriteImage(empty, str(empty_path))
    datastore.save_label(MAIN_ID, str(empty_path), "final", {})
    task = MSATrain(ModelProvider({}, tmp_path / "model"))

    with pytest.raises(MSAError, match="no training samples"):
        task({"steps": 2, "batch_size": 1, "eval_every": 1}, datastore)
    stats = task.stats()
    assert stats["status"] == "FAILED" and "no training samples" in stats["error"], stats
    assert not (tmp_path / "model" / PUBLISHED).exists() and not (tmp_path / "model" / DRAFT).exists()


def test_a_running_record_reads_stopped_once_its_process_is_gone(app_lib, tmp_path):
    ModelProvider, MSATrain = app_lib
    task = MSATrain(ModelProvider({}, tmp_path))
    me = psutil.Process()

    def record(pid: int, created: float) -> dict:
        task.stats_path.write_text(json.dumps({"status": "RUNNING", "step": 3, "pid": pid, "pid_created": created}))
        return task.stats()

    assert record(me.pid, me.create_time())["status"] == "RUNNING"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(ended.pid).create_time()
    ended.wait()
    assert record(ended.pid, created)["status"] == "STOPPED"
    assert record(me.pid, me.create_time() - 100)["status"] == "STOPPED"  # same pid, another process
    assert record(me.pid, me.create_time())["step"] == 3


@pytest.mark.parametrize(("params", "key"), [({"steps": "abc"}, "steps"), ({"steps": -3}, "steps"),
                                             ({"steps": 4, "eval_every": 0}, "eval_every")])
def test_bad_params_are_a_failed_run_not_the_previous_one(app_lib, params, key, tmp_path):
    """A run that ends at once (params the route would have refused, sent some other way) is
    recorded FAILED with its error: /info/ must not keep showing the previous run."""
    from monailabel.datastore.local import LocalDatastore
    from msa.errors import MSAError

    ModelProvider, MSATrain = app_lib
    task = MSATrain(ModelProvider({}, tmp_path / "model"))
    task.stats_path.parent.mkdir(parents=True)
    task.stats_path.write_text(json.dumps({"status": "DONE", "step": 4, "start_ts": 1.0}))
    studies = tmp_path / "studies"
    studies.mkdir()
    with pytest.raises(MSAError, match=key):
        task({"model": "msa", "gpus": "all", "local_rank": 0, **params}, LocalDatastore(str(studies)))
    stats = task.stats()
    assert stats["status"] == "FAILED" and key in stats["error"], stats
    assert stats["start_ts"] > 1.0, stats


def test_a_3d_server_starts_on_the_shipped_2d_adapters_and_says_it_answers_as_2d(app_lib, tmp_path, caplog):
    """--conf three_d true with no 3D adapter file shipped: the model is built (no start-up failure), the
    2D file serves, and a warning names it and says the depth branch adds nothing."""
    from msa.modeling.build import default_adapters

    ModelProvider, _ = app_lib
    provider = ModelProvider({"three_d": "true", "runtime": "torch"}, tmp_path / "model")
    with caplog.at_level("WARNING"):
        model, served = provider.build()
    assert model.config.three_d and served == default_adapters("lite_medsam", three_d=True)
    assert served.name == "lite_medsam_adapters.pt"  # the 2D file: no 3D one ships
    assert "lite_medsam_adapters.pt holds 2D adapters" in caplog.text and "adds nothing" in caplog.text


def test_an_earlier_releases_published_file_is_adopted_when_it_fits_and_left_alone_otherwise(app_lib, tmp_path, caplog):
    """model_dir/msa_adapters.pt (one file for every backbone and mode, before files were keyed): a 2D
    lite_medsam server without a file of its own adopts it (renamed: the user's trained adapters keep
    serving after the upgrade); a 3D server, which it does not fit, leaves it alone and warns."""
    import shutil

    from msa.modeling.build import default_adapters

    ModelProvider, _ = app_lib
    shipped = default_adapters("lite_medsam")
    three_d_dir, two_d_dir = tmp_path / "3d", tmp_path / "2d"
    for folder in (three_d_dir, two_d_dir):
        folder.mkdir()
        shutil.copy(shipped, folder / "msa_adapters.pt")  # stands for a user's trained 2D file

    with caplog.at_level("INFO"):
        ModelProvider({"three_d": "true", "runtime": "torch"}, three_d_dir).engine()
    assert (three_d_dir / "msa_adapters.pt").is_file() and not (three_d_dir / "msa_adapters_lite_medsam_3d.pt").exists()
    assert f"{three_d_dir / 'msa_adapters.pt'} is not served" in caplog.text

    provider = ModelProvider({"runtime": "torch"}, two_d_dir)
    provider.engine()
    adopted = two_d_dir / PUBLISHED
    assert not (two_d_dir / "msa_adapters.pt").exists() and adopted.read_bytes() == shipped.read_bytes()
    assert provider.served()[0] == adopted
    assert "renamed to" in caplog.text
