"""The documentation: the MkDocs site builds with warnings as errors, the README stays short and its
links into docs/ resolve, and every docs/ path named in code and tests exists."""

from __future__ import annotations

import glob
import os
import re
import sys

import pytest

from fedlinear.common.config import RunConfig

from tests import bounded
from tests.conftest import REPO  # noqa: E402
README = os.path.join(REPO, "README.md")

# The contract with a newcomer and with CI (.ci/run): these two lines, byte for byte.
TWO_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fedlinear run --clients 5 --rounds 5 --out runs/demo",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/pytest -q',
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``mkdocs build --strict`` into a temporary directory: broken links and anchors, pages missing
    from the nav and a configuration reference that disagrees with the code all fail it."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail('mkdocs is not installed: .venv/bin/pip install -e ".[test]"')
    out = tmp_path_factory.mktemp("site")
    done = bounded.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", os.path.join(REPO, "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return str(out)


def test_the_site_builds_strictly(site):
    assert os.path.isfile(os.path.join(site, "index.html"))


def test_the_configuration_reference_lists_every_key(site):
    with open(os.path.join(site, "reference", "configuration.html"), encoding="utf-8") as handle:
        page = handle.read()
    missing = [key for key in RunConfig.keys() if f'id="{key}"' not in page]
    assert not missing, f"the generated configuration reference lacks {missing}"


def _readme():
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def test_readme_is_short_and_keeps_the_two_commands():
    text = _readme()
    assert len(text.splitlines()) <= 200
    for command in TWO_COMMANDS:
        assert f"\n{command}\n" in text, command
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as handle:
        assert TWO_COMMANDS[1] in handle.read()


def test_readme_links_into_docs_resolve(site):
    links = re.findall(r"\]\((docs/[^)\s]*)\)", _readme())
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        assert os.path.exists(os.path.join(REPO, path)), link
        if anchor and path.endswith(".md"):
            built = os.path.join(site, os.path.splitext(path[len("docs/"):])[0] + ".html")
            with open(built, encoding="utf-8") as handle:
                assert f'id="{anchor}"' in handle.read(), link


def test_docs_paths_named_in_code_and_tests_exist():
    sources = [
        path
        for room in ("common", "clients", "server", "scripts", "fedlinear", "benchmarks", "tests")
        for path in glob.glob(os.path.join(REPO, room, "**", "*.py"), recursive=True)
    ] + [os.path.join(REPO, "pyproject.toml"), os.path.join(REPO, "benchmarks", "README.md")]
    named = {}
    for path in sources:
        with open(path, encoding="utf-8") as handle:
            for target in re.findall(r"\bdocs/[\w/.-]*\w\.(?:md|py|png)\b", handle.read()):
                named.setdefault(target, os.path.relpath(path, REPO))
    assert named
    missing = {target: where for target, where in named.items() if not os.path.isfile(os.path.join(REPO, target))}
    assert not missing, f"named but missing: {missing}"
