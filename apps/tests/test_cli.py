"""The `vats` entry point: it finds the config tree and runs the chosen pipeline."""

from __future__ import annotations

import subprocess
import sys

from vats_apps.cli import config_dir


def test_config_tree_has_root_and_pipelines():
    assert (config_dir() / "config.yaml").is_file()
    assert list((config_dir() / "pipeline").glob("*.yaml"))


def test_vats_command_runs_the_info_pipeline(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "from vats_apps.cli import main; main()", "pipeline=info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert "vats-core" in out
    assert "attention backends" in out
    assert "math" in out and "available" in out


def test_unknown_pipeline_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from vats_apps.cli import main; main()", "pipeline=nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "nope" in proc.stderr
