"""Model repository layout (common/modelrepo.py) and the exact carry-over of a model into new variables."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedlinear.common import modelrepo, scaling
from fedlinear.common.errors import FedLinearError


def _fake_model(path) -> str:
    os.makedirs(os.path.join(path, "variables"), exist_ok=True)
    with open(os.path.join(path, "saved_model.pb"), "wb") as handle:
        handle.write(b"pb")
    with open(os.path.join(path, "variables", "variables.index"), "wb") as handle:
        handle.write(b"index")
    return str(path)


def test_locate_tells_model_run_and_base_apart(tmp_path):
    model = _fake_model(tmp_path / "run" / "model")
    (tmp_path / "run" / "manifest.json").write_text("{}")
    assert modelrepo.locate(model).kind == "model"
    assert modelrepo.locate(str(tmp_path / "run")).kind == "run"
    base = tmp_path / "base"
    assert modelrepo.publish(model, str(base), {"x": 1}) == (1, str(base / "1"))
    assert modelrepo.publish(model, str(base), {}) == (2, str(base / "2"))
    os.mkdir(base / "3")  # a claimed number, not yet renamed into place: not a version
    assert modelrepo.locate(str(base)).kind == "base"
    assert modelrepo.list_versions(str(base)) == [1, 2]
    assert modelrepo.publish(model, str(base), {})[0] == 4  # never reuses a claimed number
    assert not [n for n in os.listdir(base) if n.startswith(".")]  # no staging left behind
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(FedLinearError, match="not a model"):
        modelrepo.locate(str(tmp_path / "junk"))
    with pytest.raises(FedLinearError, match="no such directory"):
        modelrepo.locate(str(tmp_path / "nope"))


def test_origin_resolves_every_kind_and_the_lineage_names_the_parent(tmp_path):
    model = _fake_model(tmp_path / "run" / "model")
    (tmp_path / "run" / "manifest.json").write_text('{"run-id": 7, "weights": {"kernel": [1.0], "bias": 2.0}}')
    base = str(tmp_path / "base")
    modelrepo.publish_run(str(tmp_path / "run"), base)
    for given, kind, version in ((str(tmp_path / "run"), "run", None), (model, "run", None), (base, "base", 1),
                                 (os.path.join(base, "1"), "base", 1)):  # fmt: skip
        origin = modelrepo.origin(given)
        assert (origin.kind, origin.version, origin.info["run-id"]) == (kind, version, 7), given
        lineage = origin.lineage(modelrepo.model_digest(origin.uri))
        assert lineage["parent"]["run-id"] == 7 and len(lineage["parent"]["model-sha256"]) == 64


@pytest.mark.parametrize("kind", ["whiten", "scale", "none"])
def test_from_raw_carries_a_model_into_new_variables_exactly(kind):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)) * [1, 100, 1e-3, 5] + [0, 1e4, 3, -2]
    y = x @ [1.0, -0.01, 300.0, 2.0] + 7 + rng.normal(size=400)
    transform = scaling.build_transform(kind, scaling.PooledStats.of(x, y), 4)
    kernel, bias = np.array([0.5, 0.02, -40.0, 1.5]), -3.25
    w, b, residual = transform.from_raw(kernel, bias)
    back_kernel, back_bias = transform.to_raw(w, b)
    np.testing.assert_allclose(back_kernel, kernel, rtol=1e-10, atol=1e-12)
    assert back_bias == pytest.approx(bias, rel=1e-10, abs=1e-9)
    assert residual < 1e-9
