"""Exact sums of float64 arrays through SecAgg+'s integer arithmetic (no Flower here).

SecAgg+ adds integers modulo 2**32, one per coordinate, after quantizing each float to the grid of
step ``2c/Q`` in ``±c`` (``c`` the clipping range, ``Q`` the quantization range). Statistics such as
``Σx`` or ``Σ(x − μ)²`` of real tables span many orders of magnitude and need every bit of a float64,
which one 32-bit coordinate cannot carry. So each value is written as a **fixed-point integer split
into limbs** (base-2**L digits, two's complement), every limb travels as one SecAgg+ coordinate, and
the sums of the limbs are recombined with their carries into the exact integer sum:

* a value ``v`` with exponent ``lo`` becomes the integer ``V = round(v · 2**-lo)`` (exact when ``v`` is
  a multiple of ``2**lo``: always with ``lo = FULL_LO = -1074``, the float64 grid);
* ``V mod 2**W`` (``W`` = limbs x L bits) is cut into ``L``-bit digits ``u_0 .. u_{m-1}``, each in
  ``[0, 2**L)``; the party sends the float ``u_j − Q/2`` with ``Q = 2**L`` and ``c = Q/2``, for which
  SecAgg+'s quantizer gives back exactly ``u_j`` (powers of two, integers below 2**53: no rounding,
  and its stochastic rounding leaves an integer unchanged) and its clipping never acts;
* with every party's weight 1 (``max_weight`` 1) the unmasked mean times the number of parties ``k``
  is, exactly after rounding to the nearest integer, ``Σ_p u_j(p)`` for every limb (``k·Q < 2**32``,
  so nothing wraps);
* ``Σ_j (Σ_p u_j(p)) · 2**(L·j)`` taken modulo ``2**W`` and read as a signed number is ``Σ_p V_p``,
  exactly, as long as ``|Σ_p V_p| < 2**(W−1)``; the sum ``Σ_p V_p · 2**lo`` is then rounded once to
  float64.

With ``lo = FULL_LO`` and ``W`` covering 2**1024 (:func:`full_width`) the pooled sum is the exact sum
of the parties' float64 values, correctly rounded: secure aggregation adds **no error at all**. A
window (:func:`window`) for values known to satisfy ``|v| < 2**hi`` keeps ``PRECISION_BITS`` bits
below ``hi``: each party's value is rounded by at most ``2**(hi − PRECISION_BITS − 1)``, i.e. a
relative ``2**-PRECISION_BITS`` (5e-20) of the bound, far below float64's own rounding.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedlinear.common.errors import FedLinearError

FULL_LO = -1074  # the smallest float64 subnormal is 2**-1074: every finite float is a multiple of it
FULL_HI = 1024  # every finite float64 is below 2**1024 in magnitude
PRECISION_BITS = 64  # bits a window keeps below its bound


def limb_bits(num_parties: int) -> int:
    """Bits per limb for ``num_parties``: ``k · 2**L < 2**31`` (SecAgg+ sums modulo 2**32, and its
    quantizer goes through int32)."""
    if num_parties < 1:
        raise ValueError("no parties")
    return 31 - int(num_parties).bit_length()


def width(lo: int, hi: int, num_parties: int, bits: int) -> int:
    """Limbs for values ``|v| < 2**hi`` on the grid ``2**lo``, summed over ``num_parties`` parties."""
    total_bits = (hi - lo) + int(num_parties).bit_length() + 2  # magnitude, growth of the sum, sign
    return max(1, math.ceil(total_bits / bits))


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How one named array is written: per-element grid exponent ``lo`` (same shape as the array,
    flattened), ``limbs`` digits of ``bits`` bits each, for at most ``num_parties`` parties."""

    lo: np.ndarray  # int64, (size,)
    limbs: int
    bits: int
    num_parties: int
    span: int = FULL_HI - FULL_LO  # a party's |V| must be below 2**span (the window: |v| < 2**(lo + span))

    @property
    def modulus(self) -> int:
        return 1 << (self.limbs * self.bits)

    @property
    def half_range(self) -> int:
        """``Q / 2``: the offset that centres a digit on SecAgg+'s ``±c`` (``c = Q/2``)."""
        return 1 << (self.bits - 1)

    def bound(self) -> int:
        """Largest ``|V|`` one party may send: inside its window, and so that the sum of
        ``num_parties`` cannot wrap."""
        return min((self.modulus >> 1) // self.num_parties - 1, (1 << self.span) - 1)


def full(size: int, num_parties: int) -> Encoding:
    """Any finite float64, exactly."""
    bits = limb_bits(num_parties)
    return Encoding(np.full(size, FULL_LO, np.int64), width(FULL_LO, FULL_HI, num_parties, bits), bits, num_parties)


def window(hi: np.ndarray, num_parties: int) -> Encoding:
    """Values known to satisfy ``|v| < 2**hi`` (per element), ``PRECISION_BITS`` bits below each bound."""
    bits = limb_bits(num_parties)
    hi = np.asarray(hi, np.int64).ravel()
    lo = np.maximum(hi - PRECISION_BITS, FULL_LO)
    span = int((hi - lo).max()) if hi.size else 1
    return Encoding(lo.astype(np.int64), width(0, span, num_parties, bits), bits, num_parties, PRECISION_BITS)


def _to_int(value: float, lo: int) -> int:
    """``round(value · 2**-lo)`` exactly (half away from zero), with Python integers."""
    num, den = float(value).as_integer_ratio()  # den is a power of two
    shift = -lo - (den.bit_length() - 1)  # value · 2**-lo = num · 2**shift
    if shift >= 0:
        return num << shift
    half = 1 << (-shift - 1)
    return (num + half) >> -shift if num >= 0 else -((-num + half) >> -shift)


def encode(values: np.ndarray, enc: Encoding, what: str) -> np.ndarray:
    """The digits of ``values`` (float64, flattened) as SecAgg+ inputs: float64 ``(size, limbs)``,
    each ``u − Q/2``. Raises FedLinearError when a value is not finite or outside its window."""
    flat = np.asarray(values, np.float64).ravel()
    if flat.shape != enc.lo.shape:
        raise FedLinearError(f"secure sum: '{what}' has {flat.size} values, the encoding {enc.lo.size}")
    if not np.isfinite(flat).all():
        raise FedLinearError(f"secure sum: '{what}' is not finite")
    mask, limit = (1 << enc.bits) - 1, enc.bound()
    out = np.empty((flat.size, enc.limbs), np.float64)
    for i, (v, lo) in enumerate(zip(flat.tolist(), enc.lo.tolist(), strict=True)):
        big = _to_int(v, lo)
        if abs(big) > limit:
            raise FedLinearError(
                f"secure sum: '{what}' value {i} ({v:.6g}) is outside the window the server announced (below 2**{lo + enc.span})"
            )
        unsigned = big % enc.modulus
        for j in range(enc.limbs):
            out[i, j] = float((unsigned >> (enc.bits * j)) & mask)
    return out - float(enc.half_range)


def decode(limb_sums: np.ndarray, enc: Encoding, num_parties: int, what: str) -> np.ndarray:
    """float64 sums (flattened) from the per-limb integer sums ``(size, limbs)`` over ``num_parties``.

    Raises FedLinearError when a limb sum is not an integer in ``[0, k · (2**L − 1)]`` (the masks did
    not cancel, or a party sent something else than digits), or a sum does not fit in float64.
    """
    sums = np.asarray(limb_sums, np.float64).reshape(enc.lo.size, enc.limbs)
    top = num_parties * ((1 << enc.bits) - 1)
    if not (np.isfinite(sums).all() and (sums >= 0).all() and (sums <= top).all()):
        raise FedLinearError(f"secure sum: the unmasked '{what}' is not a sum of digits: the masks did not cancel")
    out = np.empty(enc.lo.size, np.float64)
    half = enc.modulus >> 1
    for i, lo in enumerate(enc.lo.tolist()):
        total = 0
        for j in range(enc.limbs):
            total += int(sums[i, j]) << (enc.bits * j)
        total %= enc.modulus
        if total >= half:
            total -= enc.modulus
        try:
            out[i] = total / (1 << -lo) if lo < 0 else float(total << lo)
        except OverflowError:
            raise FedLinearError(f"secure sum: the pooled '{what}' overflows float64") from None
    return out


def limb_sums_from_mean(mean: np.ndarray, enc: Encoding, num_parties: int) -> np.ndarray:
    """SecAgg+'s unmasked result (the mean over ``num_parties`` of ``u − Q/2``, weight 1 each) back
    to the integer sums of the digits (as float64, exact: every quantity is below 2**32)."""
    return np.rint(np.asarray(mean, np.float64) * num_parties + num_parties * float(enc.half_range))


def to_config(enc: Encoding) -> dict:
    return {"limbs": enc.limbs, "bits": enc.bits, "num-parties": enc.num_parties, "span": enc.span}


def from_parts(lo: np.ndarray, config: dict) -> Encoding:
    try:
        limbs, bits, parties = int(config["limbs"]), int(config["bits"]), int(config["num-parties"])
        span = int(config.get("span", FULL_HI - FULL_LO))
    except (KeyError, TypeError, ValueError) as exc:
        raise FedLinearError(f"secure sum: malformed encoding ({exc})") from None
    lo = np.asarray(lo, np.int64).ravel()
    if not (1 <= bits <= 30 and 1 <= limbs <= 4096 and parties >= 1 and 1 <= span <= FULL_HI - FULL_LO
            and (lo >= FULL_LO).all() and (lo <= FULL_HI).all()):  # fmt: skip
        raise FedLinearError("secure sum: encoding out of range")
    return Encoding(lo, limbs, bits, parties, span)
