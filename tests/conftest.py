"""Shared fixtures for the CLI, io, verify and pipeline tests: a small model written as ONNX text,
the CLI run in-process (onnxopt.cli.main, as the `onnxopt` script runs it) or in a subprocess, and
the checks every failing run must pass (one line on stderr, no traceback, nothing written).

Helpers are fixtures (not imports from conftest) so they cannot clash with other conftest files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

import onnx
import pytest

from models.builders import from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# cleanup alone turns the Constant into an initializer and removes the Identity: 4 nodes -> 2.
SIMPLE_TEXT = HEADER + """
g (float[2,3] x) => (float[2,3] y) {
  c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  i = Identity(x)
  a = Add(i, c)
  y = Relu(a)
}"""


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def simple_model():
    """x -> Identity -> Add(Constant) -> Relu -> y (4 nodes; cleanup leaves Add, Relu)."""
    return from_text(SIMPLE_TEXT)


@pytest.fixture
def simple_path(tmp_path, simple_model):
    """The simple model saved as tmp_path/in.onnx."""
    path = tmp_path / "in.onnx"
    onnx.save(simple_model, path)
    return path


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process, exactly as the `onnxopt` script does: onnxopt.cli.main(argv)."""
    from onnxopt.cli import main

    def run(*args) -> Ran:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return Ran(exc.value.code, captured.out, captured.err)

    return run


@pytest.fixture
def cli_subprocess():
    """Run `python -m onnxopt.cli ARGS` with stdout and stderr as pipes (not a terminal)."""

    def run(*args, cwd=None, command=None) -> Ran:
        argv = command or [sys.executable, "-m", "onnxopt.cli"]
        proc = subprocess.run([*argv, *[str(a) for a in args]], capture_output=True, text=True, cwd=cwd,
                              timeout=120)
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def assert_error():
    return _assert_error


def _assert_error(ran: Ran, code: int, *fragments: str) -> str:
    """A failed run: the exit code, nothing on stdout, exactly one stderr line `onnxopt: error: ...`
    holding every fragment, and no traceback."""
    assert ran.code == code, ran.err
    assert ran.out == ""
    lines = ran.err.splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("onnxopt: error: "), ran.err
    assert "Traceback" not in ran.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def sha256():
    def digest(path) -> str:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    return digest


@pytest.fixture
def leftovers():
    """Temporary files a run left in a folder (io writes `.NAME.XXXX.tmp` and `.tmp.data`)."""

    def find(folder) -> list[str]:
        return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or ".tmp." in n)

    return find
