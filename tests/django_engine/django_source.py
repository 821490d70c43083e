"""Django's own session tests (`tests/sessions_tests` in its source distribution), for our engine to pass.

Django's wheel ships no tests: the sdist of the installed version is downloaded once from PyPI
into `.cache/` at the repository root and the `sessions_tests` package extracted from it. Nothing of
Django's is committed here.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / f"django-{django.__version__}"


def sessions_tests_parent() -> Path:
    """A directory holding Django's `sessions_tests` package (to put on `sys.path`)."""
    package = CACHE / "sessions_tests"
    if (package / "tests.py").exists():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"django=={django.__version__}",
                "--dest",
                download,
            ],  # fmt: skip
            check=True,
            capture_output=True,
            timeout=300,
        )
        (sdist,) = Path(download).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/tests/sessions_tests/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.lower().startswith(prefix.lower()) and m.isfile()]
            for member in members:
                target = package / member.name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
    if not (package / "tests.py").exists():
        raise RuntimeError(f"no tests/sessions_tests in Django {django.__version__}'s sdist")
    return CACHE
