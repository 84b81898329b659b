"""What Fleet requests weigh for a linear model: ``python -m fedlinear.scripts.deploy.fleetsizes [FEATURES ...]``.

A SuperNode's reply travels as ``push-messages`` (the message and its object tree) followed by one
``push-object`` per object; Flower 1.42 splits every array into chunks of at most
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` bytes (5 MiB), so the largest ``push-object`` body stays near
5 MiB whatever the model's size. This builds the reply a fedlinear client sends (kernel, bias, a few
metrics) with Flower's own classes and prints the sizes of the request bodies, which is what the
Fleet front's per-path limits (:func:`~fedlinear.scripts.deploy.fleetfront.default_body_limits`) are
sized against.
"""

from __future__ import annotations

import sys


def request_sizes(features: int, seed: int = 0) -> dict[str, int]:
    """Bytes of the largest ``push-object`` body, of all of them, and of the object tree, for a
    linear model with ``features`` inputs (random float64 weights, so no chunk deduplicates)."""
    import numpy as np
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.proto.message_pb2 import ObjectTree, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    rng = np.random.default_rng(seed)
    content = RecordDict({
        "arrays": ArrayRecord([rng.standard_normal((features, 1)), rng.standard_normal(1)]),
        "metrics": MetricRecord({"num-examples": 1000, "train-mse": 0.5, "clip-norm": 1.0}),
    })  # fmt: skip
    objects = get_all_nested_objects(content)
    bodies = [
        len(PushObjectRequest(node=Node(node_id=2**63 - 1), run_id=2**63 - 1, object_id=oid,
                              object_content=obj.deflate()).SerializeToString())  # fmt: skip
        for oid, obj in objects.items()
    ]
    tree: ObjectTree = get_object_tree(content)
    return {"objects": len(objects), "largest-push-object": max(bodies), "all-push-objects": sum(bodies),
            "object-tree": len(tree.SerializeToString())}  # fmt: skip


def main(argv: list[str]) -> int:
    from fedlinear.scripts.deploy.fleetfront import default_body_limits

    limits = default_body_limits()
    print(f"front limits: push-object {limits['/v1/fleet/push-object']} B, push-messages "
          f"{limits['/v1/fleet/push-messages']} B, others {limits['/v1/fleet/get-run']} B")  # fmt: skip
    for text in argv or ["10", "10000", "1000000", "10000000"]:
        sizes = request_sizes(int(text))
        print(f"{int(text):>10} features: {sizes['objects']} objects, largest push-object body "
              f"{sizes['largest-push-object']} B, all {sizes['all-push-objects']} B, object tree {sizes['object-tree']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
