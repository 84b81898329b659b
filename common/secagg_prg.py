"""The mask generator for secure aggregation: a drop-in for Flower 1.42's ``pseudo_rand_gen``.

Flower's SecAgg+ expands every mask seed (a 32-byte private seed, or a 32-byte key agreed between
two parties) with ``flwr/common/secure_aggregation/secaggplus_utils.py::pseudo_rand_gen``, which
XOR-folds the seed down to **32 bits** and feeds it to ``numpy.random.RandomState``. A mask then has
only 2**32 possible values, and the server can search them: it legitimately learns every surviving
party's private seed in the unmask stage, so a party left with a single pairwise mask (e.g. 3 parties,
one of which drops out after sharing keys) is unmasked by trying 2**32 seeds until every coordinate
of ``masked - private_mask - candidate`` falls in the quantizer's small range ``[0, Q]``.

:func:`pseudo_rand_gen` keeps the signature and the output (int64 arrays uniform in
``[0, num_range)``) but draws the stream from ChaCha20 keyed with SHA-256 of the whole seed, so the
masks carry the seed's full 256 bits. server/secure.py and clients/secure.py install it in Flower's
workflow and mod, on both sides of the protocol (the same app code runs on every node).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DOMAIN = b"fedlinear secure-aggregation mask v1"


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Arrays of the given shapes, int64 uniform in ``[0, num_range)``, determined by ``seed``.

    ``num_range`` must be a power of two up to 2**32 (SecAgg+'s modulus; Flower checks it is a
    power of two), so masking the 32-bit ChaCha20 words keeps them uniform.
    """
    if num_range < 1 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"mask range must be a power of two <= 2**32, got {num_range}")
    sizes = [math.prod(dimension) for dimension in dimensions_list]
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(b"\0" * (4 * sum(sizes))), dtype="<u4").astype(np.int64)
    words &= num_range - 1
    out, start = [], 0
    for dimension, size in zip(dimensions_list, sizes, strict=True):
        chunk = words[start : start + size]
        start += size
        out.append(np.array(chunk[0], dtype=np.int64) if len(dimension) == 0 else chunk.reshape(dimension).copy())
    return out
