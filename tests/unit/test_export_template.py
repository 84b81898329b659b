"""The SavedModel template (common/export_template.py): the weights it writes make the same variables files and
fingerprint checkpoint_hash as TensorFlow writing those weights (hypothesis, TensorFlow in this process), and anything
unexpected is refused so the caller exports with TensorFlow. Whole directories, byte for byte against a fresh
process's TensorFlow export, and loaded with plain TensorFlow: tests/e2e/test_export_template.py."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlinear.common import export, export_template
from fedlinear.common.export_template import DATA, INDEX, Unusable
from fedlinear.common.model import LinearWeights

_written: dict[tuple[int, bool], dict[str, bytes]] = {}


def tensorflow_files(weights: LinearWeights, tmp: str) -> dict[str, bytes]:
    path = os.path.join(tmp, f"tf-{len(os.listdir(tmp))}")
    export.save_local(weights, path)
    return export_template._read(path)


def some_template(num_features: int, bias: bool, tmp: str) -> dict[str, bytes]:
    """TensorFlow's files for this shape with the probe weights (made once per shape in this process)."""
    if (num_features, bias) not in _written:
        _written[num_features, bias] = tensorflow_files(export_template.probe_weights(num_features, bias), tmp)
    return _written[num_features, bias]


def field(fingerprint: bytes, number: int) -> bytes:
    [(start, end)] = [(s, e) for n, _, s, _, e in export_template._fields(fingerprint) if n == number]
    return fingerprint[start:end]


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
MAX32 = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(1, 64), bias=st.booleans(), data=st.data())
@example(d=3, bias=True, data=None)
def test_the_template_writes_what_tensorflow_writes_for_any_weights(tmp_path_factory, d, bias, data):
    if data is None:  # the values that most often go wrong, explicitly
        kernel, b = [-0.0, TINY, MAX32], [-MAX32]
    else:
        kernel, b = data.draw(st.lists(finite32, min_size=d, max_size=d)), [data.draw(finite32)]
    weights = LinearWeights(np.array(kernel, np.float32).reshape(-1, 1), np.array(b, np.float32) if bias else None)
    tmp = str(tmp_path_factory.getbasetemp())
    rendered = export_template.render(some_template(len(kernel), bias, tmp), weights)
    theirs = tensorflow_files(weights, tmp)
    assert rendered[DATA] == theirs[DATA]
    assert rendered[INDEX] == theirs[INDEX]
    for number in (5, 6):  # checkpoint_hash, version (1-4 hash saved_model.pb: a later export's function names)
        assert field(rendered["fingerprint.pb"], number) == field(theirs["fingerprint.pb"], number)
    uuid = field(rendered["fingerprint.pb"], 7)[2:]
    assert uuid.isdigit() and int(uuid) < 2**128 and uuid != field(theirs["fingerprint.pb"], 7)[2:]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(export_template.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_no_template_means_unusable_and_off_means_none(cache, monkeypatch, tmp_path):
    weights = export_template.probe_weights(4, True)
    with pytest.raises(Unusable, match="no template for d = 4"):
        export_template.export(weights, str(tmp_path / "m"), export.definition())
    assert not (tmp_path / "m").exists() and not export.template_available(4, True)
    monkeypatch.setenv(export_template.CACHE_ENV, "off")
    assert not export_template.enabled() and not export.template_available(4, True)
    with pytest.raises(Unusable, match="off"):
        export_template.cache_root()


def test_the_key_names_the_versions_the_definition_and_the_shape(cache):
    key = export_template.key(7, False, export.definition())
    assert key.startswith(f"tf{export_template.tensorflow_version()}-pb") and key.endswith("-d7-nobias-float32")
    assert f"-f{export_template.FORMAT}-{export.definition()}-" in key
    assert export_template.key(7, True, "other") != export_template.key(7, True, export.definition())


def test_a_template_is_made_once_used_without_tensorflow_and_checked(cache, tmp_path):
    some_template(5, True, str(tmp_path))  # this process has imported TensorFlow and saved with it ...
    with pytest.raises(Unusable, match="fresh process's first TensorFlow export"):
        export.make_template(5, True)  # ... so its function names are not a fresh process's: not kept
    assert not export.template_available(5, True)
    path = str(cache / export_template.key(5, True, export.definition()))
    export_template._write(_written[5, True], path)
    meta = {"key": os.path.basename(path), "format": export_template.FORMAT}
    (cache / os.path.basename(path) / export_template.META).write_text(json.dumps(meta))
    assert export.template_available(5, True)
    weights = LinearWeights(np.arange(5, dtype=np.float32).reshape(-1, 1) - 2, np.array([0.5], np.float32))
    assert export.export(weights, str(tmp_path / "m")) == "template"
    files = export_template._read(str(tmp_path / "m"))
    assert np.frombuffer(files[DATA][:24], "<f4").tolist() == [-2, -1, 0, 1, 2, 0.5]

    # a template that is not this one (another key in its template.json), or damaged: TensorFlow writes the model
    meta_path = os.path.join(path, export_template.META)
    meta = json.loads(open(meta_path).read())
    with open(meta_path, "w") as f:
        json.dump(meta | {"key": "tf0.0-other"}, f)
    with pytest.raises(Unusable, match="not this one"):
        export_template.write_local(weights, str(tmp_path / "n"), export.definition())
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    index = os.path.join(path, INDEX)
    whole = open(index, "rb").read()
    with open(index, "wb") as f:
        f.write(whole[:-1])
    with pytest.raises(Unusable, match="not a LevelDB-format table"):
        export_template.write_local(weights, str(tmp_path / "n"), export.definition())
    assert export.export(weights, str(tmp_path / "n")) == "tensorflow"
    assert export.read_linear(str(tmp_path / "n")).kernel.tolist() == [-2, -1, 0, 1, 2]


def test_a_layout_other_than_expected_is_refused(tmp_path):
    files = some_template(2, True, str(tmp_path))
    weights = export_template.probe_weights(2, True)
    with pytest.raises(Unusable, match="do not match d = 3"):
        export_template.render(files, export_template.probe_weights(3, True))
    with pytest.raises(Unusable, match="do not match d = 2"):
        export_template.render(files, LinearWeights(weights.kernel, None))  # the template has a bias
    layout = export_template.Layout(files[INDEX], 2, True)
    (offset, size), *_ = layout.blocks
    compressed = bytearray(files[INDEX])
    compressed[offset + size] = 1  # snappy
    with pytest.raises(Unusable, match="compressed"):
        export_template.render(files | {INDEX: bytes(compressed)}, weights)
    other = bytearray(files["fingerprint.pb"]) + b"\x40\x01"  # a field 8 this does not know
    with pytest.raises(Unusable, match="fingerprint.pb has fields"):
        export_template.render(files | {"fingerprint.pb": bytes(other)}, weights)
    assert struct.unpack_from("<Q", files[INDEX], len(files[INDEX]) - 8)[0] == export_template.TABLE_MAGIC


def test_two_runs_adopting_one_shape_keep_one_template(cache, tmp_path, monkeypatch):
    files = some_template(2, False, str(tmp_path))
    source = tmp_path / "written"
    export_template._write(files, str(source))
    weights = export_template.probe_weights(2, False)
    version = export_template.tensorflow_version()
    target = export_template.template_dir(2, False, "h")
    rename = os.rename

    def racing(src, dst):  # another run's template lands between this one's look and its rename
        export_template._write(files, dst)
        with open(os.path.join(dst, export_template.META), "w") as f:
            f.write("{}")
        rename(src, dst)

    monkeypatch.setattr(export_template.os, "rename", racing)
    assert export_template.adopt(str(source), weights, "h", version) == target  # theirs is kept
    monkeypatch.setattr(export_template.os, "rename", rename)
    assert sorted(os.listdir(cache)) == [os.path.basename(target)]  # this one's staging directory is gone
    assert open(os.path.join(target, export_template.META)).read() == "{}"
    assert export_template.adopt(str(source), weights, "h", version) == target  # already there: nothing to do
    with pytest.raises(Unusable, match="not the installed"):
        export_template.adopt(str(source), weights, "h", "0.0.1")
    with pytest.raises(Unusable, match="does not reproduce"):
        export_template.adopt(str(source), LinearWeights(weights.kernel * 2, None), "h", version)
