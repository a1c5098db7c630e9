"""The `msa` command line: `msa params` and its error contract (exit 2, one line on stderr)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def msa_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m msa.cli`."""
    script = Path(sys.executable).parent / "msa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "msa.cli"]


def run_msa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*msa_command(), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_params_vit_b_within_the_papers_budget(three_d, capsys):
    """MSA on ViT-B trains under 5% of the parameters, in 2D and with the 3D depth branch."""
    result = run_msa("params", "--backbone", "vit_b", "--json", *(["--three-d"] if three_d else []))
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    with capsys.disabled():
        print("\nvit_b", "3D" if three_d else "2D", counts)
    assert set(counts) == {"total", "trainable", "trainable_fraction"}
    assert counts["total"] > 9e7
    assert 0 < counts["trainable_fraction"] < 0.05
    assert counts["trainable_fraction"] == pytest.approx(counts["trainable"] / counts["total"])


def test_params_lite_medsam_is_reported(capsys):
    """lite_medsam's counts are printed (its decoder, trained in full, dominates a small model).
    In process, through main(): the subprocess path is covered by the vit_b tests."""
    from msa.cli import main

    assert main(["params", "--backbone", "lite_medsam", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print("\nlite_medsam 2D", counts)
    assert 9e6 < counts["total"] < 1.1e7
    assert 0 < counts["trainable"] < counts["total"]


def test_params_same_numbers_as_the_library(capsys):
    """The CLI's numbers are count_parameters of the built model (3D vit_tiny, through main())."""
    import msa
    from msa.cli import main

    assert main(["params", "--backbone", "vit_tiny", "--three-d", "--json"]) == 0
    expected = msa.count_parameters(msa.build_model("vit_tiny", three_d=True, pretrained=False))
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["params", "--backbone", "vit_tiny"]) == 0
    assert capsys.readouterr().out.startswith("vit_tiny: ")


def test_unknown_backbone_is_a_one_line_error(capsys):
    """A user mistake exits with code 2 and exactly one line on stderr naming the problem.
    In process (main() is what the console script runs): an import of the CLI costs seconds."""
    from msa.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["params", "--backbone", "vit_q", "--json"])
    captured = capsys.readouterr()
    with capsys.disabled():
        print("\nstderr:", captured.err)
    assert exit_info.value.code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "vit_q" in lines[0]


def test_help_starts_without_torch():
    """`msa --help` and every subcommand's help build their parser without importing torch, monai or
    segment_anything (they took 10-30 s to import), and the package's public names still resolve."""
    code = ("import sys; import msa.cli as cli; cli.build_parser(); "
            "heavy = sorted(m for m in ('torch', 'monai', 'segment_anything') if m in sys.modules); "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported at start-up: {result.stdout.strip()}"
    for command in ("segment", "eval", "train", "pretrain", "bench", "params"):
        help_run = run_msa(command, "--help")
        assert help_run.returncode == 0 and "usage: msa " + command in help_run.stdout, help_run.stderr
    names = subprocess.run([sys.executable, "-c", "from msa import BACKBONES, build_model, MSA; "
                            "from msa.names import BACKBONE_NAMES; assert tuple(BACKBONES) == BACKBONE_NAMES; "
                            "print(build_model.__module__)"], capture_output=True, text=True, timeout=120)
    assert names.returncode == 0 and names.stdout.strip() == "msa.modeling.build", names.stderr
