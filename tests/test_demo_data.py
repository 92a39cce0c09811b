"""The bundled demo data: real digits as PNG class folders, deterministic and idempotent."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pandas as pd

from training.demo_data import write_demo_data


def _fingerprint(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_data_is_deterministic_idempotent_and_keeps_test_apart(tmp_path):
    first = write_demo_data(tmp_path / "a")
    before = _fingerprint(first)
    write_demo_data(first)  # again, in place
    assert _fingerprint(first) == before
    assert _fingerprint(write_demo_data(tmp_path / "b")) == before  # elsewhere, same bytes
    manifest = pd.read_csv(first / "manifest.csv", dtype=str)
    assert len(manifest) == 1797 and manifest["label"].nunique() == 10
    assert set(manifest["split"]) == {"train", "test"}
    train = {p.name for p in (first / "train").rglob("*.png")}
    test = {p.name for p in (first / "test").rglob("*.png")}
    assert not train & test and len(train) + len(test) == 1797
    assert len(pd.read_csv(first / "train.csv")) == len(train)


def test_the_entry_points_shared_cli_does_not_import_torch():
    """`demo_data` (and `--help`) start without torch: importing it cost ~3 s."""
    code = "import sys, training.cli, training.demo_data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
