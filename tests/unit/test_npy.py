"""common.npy must be a drop-in for np.save/np.load (and so for Flower's Array) on every input."""

import io

import numpy as np
import pytest
from flwr.app import Array
from flwr.common.constant import SType

from fedlinear.common import npy

ARRAYS = [
    np.arange(10, dtype=np.float32).reshape(10, 1),
    np.zeros(1, dtype=np.float32),
    np.array(3.5),
    np.zeros((0, 3), dtype=np.int64),
    np.arange(4, dtype=">f8"),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # not contiguous
    np.array([True, False]),
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
]


def np_save(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_dumps_is_byte_identical_to_np_save_and_loads_reads_it_back(array):
    for _ in range(2):  # the second call uses the cached header
        data = npy.dumps(array)
        assert data == np_save(array)
        back = npy.loads(data)
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
        assert back.flags.writeable  # like np.load, not a view of the bytes


def test_loads_reads_fortran_order_and_format_version_2():
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(npy.loads(np_save(fortran)), fortran)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(5, dtype=np.int32), version=(2, 0))
    np.testing.assert_array_equal(npy.loads(buffer.getvalue()), np.arange(5, dtype=np.int32))


def test_bad_input_is_refused_like_np_load():
    good = npy.dumps(np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError, match="truncated"):
        npy.loads(good[:-4])
    with pytest.raises(ValueError, match="magic"):
        npy.loads(b"not an npy file at all")
    with pytest.raises(ValueError, match="version"):
        npy.loads(good[:6] + b"\x09\x00" + good[8:])
    objects = np.array([{"a": 1}], dtype=object)
    with pytest.raises(ValueError):
        npy.dumps(objects)
    # an object-dtype header (as np.save with allow_pickle=True writes) is refused before any unpickling
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    with pytest.raises(ValueError, match="object"):
        npy.loads(header.getvalue() + b"\x00" * 8)


def test_flower_array_interoperates_both_ways():
    kernel = np.linspace(-1, 1, 10, dtype=np.float32).reshape(10, 1)
    ours = Array(dtype=str(kernel.dtype), shape=tuple(kernel.shape), stype=SType.NUMPY, data=npy.dumps(kernel))
    flowers = Array(kernel)
    assert ours.data == flowers.data and ours.dtype == flowers.dtype and ours.shape == flowers.shape
    np.testing.assert_array_equal(ours.numpy(), kernel)
    np.testing.assert_array_equal(npy.loads(flowers.data), kernel)


def test_negative_dimensions_are_refused_like_np_load():
    import io

    import numpy as np
    import pytest

    from fedlinear.common import npy

    good = npy.dumps(np.zeros((2, 3), np.float32))
    bad = good.replace(b"(2, 3)", b"(-2, 3)")
    with pytest.raises(ValueError):
        np.load(io.BytesIO(bad))
    with pytest.raises(ValueError, match="invalid shape"):
        npy.loads(bad)
