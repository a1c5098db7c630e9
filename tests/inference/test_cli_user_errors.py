"""`msa segment` / `msa eval` on bad input, as a user runs them: exit code 2, one line on stderr, no file.

All of these fail before any encoder pass. The four cases of the brief (point outside, malformed
--roi, unreadable image, unknown --labels) run as real subprocesses (exit status, stderr, files);
the other variants go through msa.cli.main in-process, since each interpreter start costs ~10 s here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from msa.cli import main


def run_msa(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msa.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, command: str, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"msa {command}: error:"), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def assert_in_process_error(capsys, argv: list, command: str, fragment: str) -> None:
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"msa {command}: error:") and fragment in lines[0], captured.err


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image\n")
    return path


SEGMENT_CASES = {
    "point outside": (["--point", "122,5,3,+"], "outside the image"),
    "negative point": (["--point", "5,-1,3"], "outside the image"),
    "point beyond the last slice": (["--point", "5,5,30,-"], "outside the image"),
    "malformed point": (["--point", "1,2"], "expected i,j,k,+"),
    "bad point sign": (["--point", "1,2,3,x"], "expected i,j,k,+"),
    "roi with three numbers": (["--roi", "1,2,3"], "expected six numbers"),
    "roi with words": (["--roi", "a,b,c,d,e,f"], "expected six numbers"),
    "roi outside": (["--roi", "200,300,1,10,0,3"], "outside the image"),
    "zero-width roi": (["--roi", "5,5,1,10,0,3"], "empty"),
    "no prompt": ([], "give at least one --point or an --roi"),
    "negative margin": (["--point", "5,5,3", "--margin", "-1"], "margin must be a whole number of voxels >= 0"),
    "stop IoU above 1": (["--point", "5,5,3", "--stop-iou", "1.5"], "stop_iou must lie in [0, 1]"),
    "stop area not a number": (["--roi", "1,10,1,10,0,3", "--stop-area", "nan"], "stop_area must lie in [0, 1]"),
}


@pytest.mark.parametrize("case", ["point outside", "roi with three numbers"])
def test_segment_bad_prompt_subprocess(case, ct_paths, tmp_path):
    args, fragment = SEGMENT_CASES[case]
    out = tmp_path / "out" / "labels.nii.gz"
    result = run_msa("segment", ct_paths[0], "-o", out, *args, cwd=tmp_path)
    assert_user_error(result, "segment", fragment)
    assert not out.parent.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segment_bad_prompt(case, ct_paths, tmp_path, capsys):
    args, fragment = SEGMENT_CASES[case]
    out = tmp_path / "out" / "labels.nii.gz"
    assert_in_process_error(capsys, ["segment", ct_paths[0], "-o", out, *args], "segment", fragment)
    assert not out.parent.exists()


def test_segment_unreadable_image(not_an_image, tmp_path):
    out = tmp_path / "out" / "labels.nii.gz"
    result = run_msa("segment", not_an_image, "-o", out, "--roi", "1,10,1,10,0,0", cwd=tmp_path)
    assert_user_error(result, "segment", "cannot read image")
    assert not out.parent.exists()


def test_segment_missing_image(tmp_path, capsys):
    out = tmp_path / "out" / "labels.nii.gz"
    assert_in_process_error(capsys, ["segment", tmp_path / "nothing.nii.gz", "-o", out, "--point", "1,1,0"],
                            "segment", "not found")
    assert not out.parent.exists()


def test_eval_unknown_label_subprocess(ct_paths, tmp_path):
    report = tmp_path / "report"
    result = run_msa("eval", f"{ct_paths[0]}:{ct_paths[1]}", "--prompt", "box", "--labels", "no_such_organ",
                     "--json", "--report", report, cwd=tmp_path)
    assert_user_error(result, "eval", "unknown label 'no_such_organ'")
    assert result.stdout == ""
    assert not report.exists()


def test_eval_absent_label(ct_paths, tmp_path, capsys):
    report = tmp_path / "report"
    assert_in_process_error(capsys, ["eval", f"{ct_paths[0]}:{ct_paths[1]}", "--labels", "spleen,200", "--json",
                                     "--report", report], "eval", "label '200' is not present")
    assert not report.exists()


def test_eval_missing_data(tmp_path, capsys):
    assert_in_process_error(capsys, ["eval", tmp_path / "nothing", "--json"], "eval", "data not found")


def test_train_refuses_a_precision_its_feature_store_cannot_hold(ct_paths, capsys):
    """Training reads fp32 features from a feature store: bf16 is refused before anything is read."""
    assert_in_process_error(capsys, ["train", f"{ct_paths[0]}:{ct_paths[1]}", "--out", "never.pt", "--precision", "bf16"],
                            "train", "feature store, which holds fp32 only")
