"""clients/byname.py: the ClientApp crosses into a Ray actor as its import path (a few hundred bytes),
and what arrives is that module's own ClientApp with the same handlers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlinear.clients.byname import ClientAppByName

cloudpickle = pytest.importorskip("ray.cloudpickle")

APP = ClientAppByName(__name__, "APP")


@APP.query()
def _answer(msg: Message, context: Context) -> Message:  # pragma: no cover - never called here
    return msg


def _closure_over(app):
    def app_fn():  # what Flower's engine sends with every message (vce_api.py, _load_client_app)
        return app

    return app_fn


def test_it_is_a_client_app_and_pickles_as_a_reference():
    assert isinstance(APP, ClientApp)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        assert pickle.loads(dumps(APP)) is APP
    assert pickle.loads(cloudpickle.dumps(_closure_over(APP)))() is APP


def test_fedlinear_app_crosses_as_its_import_path():
    import fedlinear.clients.client_app as ca

    assert isinstance(ca.app, ClientAppByName)
    data = cloudpickle.dumps(_closure_over(ca.app))
    assert pickle.loads(data)() is ca.app
    # by value (Flower's own ClientApp class) the same app is several times larger: its handlers' code
    by_value = ClientApp.__new__(ClientApp)
    by_value.__dict__.update(vars(ca.app))
    assert len(data) * 3 < len(cloudpickle.dumps(_closure_over(by_value)))
    alone = cloudpickle.dumps(ca.app)  # the app itself: a function reference and two names, no code
    assert len(alone) < 200 and b"fedlinear.clients.client_app" in alone and b"_make_function" not in alone


def test_a_fresh_process_gets_its_own_module_app_with_the_same_handlers():
    import fedlinear.clients.client_app as ca

    data = cloudpickle.dumps(_closure_over(ca.app))
    code = (
        "import pickle, sys\n"
        "app = pickle.loads(sys.stdin.buffer.read())()\n"
        "import fedlinear.clients.client_app as ca\n"
        "assert app is ca.app, app\n"
        "print(sorted(app._registered_funcs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True, timeout=120)
    assert out.stdout.decode().strip() == str(sorted(ca.app._registered_funcs))
