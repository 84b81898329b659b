"""The naive server a user would write: ``tf.saved_model.load`` once, the signature called per request.

Flask-style (one handler, the model in a global), on the same ASGI stack as ``fedlinear serve``
(Starlette + uvicorn, same settings), so the comparison isolates how a prediction is computed::

    python -m benchmarks.serving.baseline MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

model = tf.saved_model.load(sys.argv[1])
predict_fn = model.signatures["serving_default"]


def predict(request_json: dict) -> dict:
    x = tf.constant(np.asarray(request_json["instances"], dtype=np.float32))
    return {"predictions": predict_fn(x=x)["y"].numpy().tolist()}


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse(predict(await request.json()))


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/v1/models/{rest:path}", endpoint, methods=["POST"]),
                        Route("/v2/health/ready", ready)])  # fmt: skip

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False,
                timeout_keep_alive=30, lifespan="off")  # fmt: skip
