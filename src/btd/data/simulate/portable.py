"""Transcendental functions that give the same bits on every x86 CPU.

NumPy picks its `exp`, `log`, `sin`, ... loops at run time by the CPU's SIMD (AVX2, AVX-512, SVML);
the variants differ in the last bit. In the virtual scanners a last-bit difference is not harmless:
it moves a value across a rounding or threshold boundary, or changes how many random numbers a
Poisson draw consumes, after which the whole noise field differs. These wrappers evaluate in
`long double`, whose loops NumPy never vectorises (scalar libm, the same code on every x86 CPU), and
round back to the input's precision, so a seed means the same cohort everywhere.
"""

from __future__ import annotations

import numpy as np

_WIDE = np.longdouble


def _out_dtype(*args) -> np.dtype:
    """float32 in, float32 out; anything else (float64, int, Python float) gives float64."""
    dtypes = [np.asarray(a).dtype for a in args]
    if all(d == np.float32 for d in dtypes):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _unary(fn):
    def wrapped(x):
        out = fn(np.asarray(x, dtype=_WIDE)).astype(_out_dtype(x))
        return out if out.ndim else out[()]

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = (
        f"`np.{fn.__name__}` evaluated in long double (bit-identical on every x86 CPU)."
    )
    return wrapped


_real_exp = _unary(np.exp)


def exp(x):
    """`np.exp` evaluated in long double; complex input as exp(re) (cos(im) + i sin(im))."""
    if np.iscomplexobj(x):
        x = np.asarray(x)
        return _real_exp(x.real) * (cos(x.imag) + 1j * sin(x.imag))
    return _real_exp(x)


log = _unary(np.log)
log2 = _unary(np.log2)
sin = _unary(np.sin)
cos = _unary(np.cos)
tan = _unary(np.tan)
arcsin = _unary(np.arcsin)
arccos = _unary(np.arccos)
arctan = _unary(np.arctan)
tanh = _unary(np.tanh)


def arctan2(y, x):
    """`np.arctan2` evaluated in long double (bit-identical on every x86 CPU)."""
    out = np.arctan2(np.asarray(y, dtype=_WIDE), np.asarray(x, dtype=_WIDE)).astype(
        _out_dtype(y, x)
    )
    return out if out.ndim else out[()]


def power(x, p):
    """`x ** p` for a non-integer exponent, evaluated in long double."""
    out = np.power(np.asarray(x, dtype=_WIDE), np.asarray(p, dtype=_WIDE)).astype(_out_dtype(x))
    return out if out.ndim else out[()]


def sinc(x):
    """sin(pi x) / (pi x), 1 at 0, as `np.sinc`, evaluated in long double."""
    wide = np.asarray(x, dtype=_WIDE)
    safe = np.where(wide == 0, _WIDE(1e-20), wide) * _WIDE(np.pi)
    out = np.where(wide == 0, _WIDE(1.0), np.sin(safe) / safe).astype(_out_dtype(x))
    return out if out.ndim else out[()]
