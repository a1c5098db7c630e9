"""Start-up of the app as a user starts it: a configured checkpoint that does not exist stops the
server at once, with one line naming the file (no traceback, no server left listening)."""

from __future__ import annotations

import os
import signal
import subprocess

from app_helpers import free_port, server_env, start_command

MISSING = "/nonexistent.pth"


def test_missing_checkpoint_stops_startup_with_one_line(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    cmd = start_command(studies, free_port(), {"checkpoint": MISSING, "model_dir": str(tmp_path / "model")}, tmp_path)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server_env(tmp_path),
                               cwd=tmp_path, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the server still runs 60 s after start with --conf checkpoint {MISSING}:\n"
                             f"{output.decode(errors='replace')[-3000:]}") from None
    text = output.decode(errors="replace")
    assert process.returncode != 0, f"exit status 0:\n{text[-3000:]}"
    # MONAI Label itself echoes its arguments (USING:: conf = ..., ENV SETTINGS ...); the app's
    # message is the line that says what is wrong with the file.
    errors = [line for line in text.splitlines() if MISSING in line and "not found" in line.lower()]
    assert errors, f"no line says {MISSING} is missing:\n{text[-3000:]}"
    assert len(set(line.split("MSA app cannot start:")[-1] for line in errors)) == 1, errors
    lines = text.splitlines()
    traceback = [n for n, line in enumerate(lines) if "Traceback" in line]
    assert not traceback, (
        f"the one-line error {errors[-1]!r} comes with a traceback of {len(lines) - traceback[0]} lines "
        f"(exit status {process.returncode}), ending:\n" + "\n".join(lines[-4:]))
