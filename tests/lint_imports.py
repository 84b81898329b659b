"""Check the import-linter contracts in pyproject.toml: ``python -m tests.lint_imports``.

import-linter (grimp) finds a package's modules by walking its folder, and in the checkout
``fedlinear/<room>/`` holds only the redirect to the top-level folder; so the check runs over a copy
laid out as the wheel lays it out (``fedlinear/common/...``), which is also what users import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import fedlinear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_copy(dest: str) -> str:
    """``dest/fedlinear`` with every room's ``.py`` files inside it; returns ``dest``."""
    root = os.path.join(dest, "fedlinear")
    os.makedirs(root)
    for name in os.listdir(os.path.join(REPO, "fedlinear")):  # the package's own modules (not the redirects)
        if name.endswith(".py"):
            shutil.copy2(os.path.join(REPO, "fedlinear", name), root)
    for room in fedlinear.ROOMS:
        shutil.copytree(os.path.join(REPO, room), os.path.join(root, room),
                        ignore=lambda folder, names: [n for n in names if n == "__pycache__" or
                                                      (not n.endswith(".py") and not os.path.isdir(os.path.join(folder, n)))])  # fmt: skip
    return dest


def lint_imports(**run) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` over a package copy with the contracts of the repository's pyproject.toml."""
    with tempfile.TemporaryDirectory() as tmp:
        package_copy(tmp)
        executable = os.path.join(os.path.dirname(sys.executable), "lint-imports")
        return subprocess.run([executable, "--config", os.path.join(REPO, "pyproject.toml"), "--no-cache", "--no-logo"],
                              cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, timeout=300, **run)  # fmt: skip


if __name__ == "__main__":
    sys.exit(lint_imports().returncode)
