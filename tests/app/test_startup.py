"""Start-up of the app as a user starts it: a configured checkpoint or adapters file that does not
fit stops the server at once, with one line naming the file (no traceback, no server left
listening)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from app_helpers import free_port, server_env, start_command

MISSING = "/nonexistent.pth"


def start_until_exit(tmp_path: Path, conf: dict[str, str], timeout: float) -> tuple[int, str]:
    """Start the server; its exit status and output once it exits (AssertionError if it serves on)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    cmd = start_command(studies, free_port(), {**conf, "model_dir": str(tmp_path / "model")}, tmp_path)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server_env(tmp_path),
                               cwd=tmp_path, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the server still runs {timeout:.0f} s after start with --conf {conf}:\n"
                             f"{output.decode(errors='replace')[-3000:]}") from None
    return process.returncode, output.decode(errors="replace")


def assert_one_line_error(returncode: int, text: str, path: str, words: str) -> None:
    assert returncode != 0, f"exit status 0:\n{text[-3000:]}"
    # MONAI Label itself echoes its arguments (USING:: conf = ..., ENV SETTINGS ...); the app's
    # message is the line that says what is wrong with the file.
    errors = [line for line in text.splitlines() if path in line and words in line.lower()]
    assert errors, f"no line says what is wrong with {path}:\n{text[-3000:]}"
    assert len(set(line.split("MSA app cannot start:")[-1] for line in errors)) == 1, errors
    lines = text.splitlines()
    traceback = [n for n, line in enumerate(lines) if "Traceback" in line]
    assert not traceback, (
        f"the one-line error {errors[-1]!r} comes with a traceback of {len(lines) - traceback[0]} lines "
        f"(exit status {returncode}), ending:\n" + "\n".join(lines[-4:]))


def test_missing_checkpoint_stops_startup_with_one_line(tmp_path):
    returncode, text = start_until_exit(tmp_path, {"checkpoint": MISSING}, timeout=60)
    assert_one_line_error(returncode, text, MISSING, "not found")


def test_adapters_that_do_not_fit_stop_startup_with_one_line(tmp_path):
    """--conf adapters names a file from before adapter files named their decoder parts: the
    model is built at start-up, so the server stops there (it used to start, then answer every
    infer 422)."""
    from test_adapters import old_format_adapters

    from msa.modeling.build import default_adapters

    adapters = old_format_adapters(default_adapters("lite_medsam"), tmp_path / "old_adapters.pt")
    returncode, text = start_until_exit(tmp_path, {"adapters": str(adapters)}, timeout=240)
    assert returncode == 2, f"exit status {returncode}:\n{text[-3000:]}"
    assert_one_line_error(returncode, text, str(adapters), "decoder")
    assert [line for line in text.splitlines() if line.startswith("MSA app cannot start:")], text[-3000:]
