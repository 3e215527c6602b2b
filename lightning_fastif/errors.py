"""The exception types of lightning_fastif, and the argument checks that raise them.

One policy for bad input, everywhere in the package: a wrong argument raises :class:`ArgumentError` (both a
``ValueError`` and a ``TypeError``, so either ``except`` catches it) with one phrasing::

    <argument>: expected <what is accepted>, got <the value>

The checks run where the argument arrives (constructors, ``setup`` hooks, the app before ``fit``), before any long
work starts. Failures of the work itself have their own types below. This module imports only the standard library,
so every layer can use it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ArgumentError(ValueError, TypeError):
    """A bad argument: the message names the argument, the value and what is accepted."""


class SnapshotError(RuntimeError):
    """A snapshot, manifest or tensor file is missing, unreadable or inconsistent; the message names the path."""


class SnapshotNotFoundError(SnapshotError, FileNotFoundError):
    """A snapshot directory, manifest or tensor file does not exist (also a ``FileNotFoundError``)."""


class LiSSADivergenceError(ArithmeticError):
    """LiSSA's recursion grew without bound: ``scale`` is below the largest Hessian eigenvalue, or damping is too
    small for a negative curvature direction. The message names the knob to change and a value that would work."""


class NonFiniteError(ArithmeticError):
    """A loss, gradient, Hessian-vector product, solve or score is NaN or infinite; the message names the training
    and/or test indices involved (or says that every example is affected), so nothing non-finite is ranked."""


class ConvergenceError(ArithmeticError):
    """A solve missed its tolerance and the estimator was built with ``strict=True``; the message names the
    estimator, the residual, the tolerance and the setting to change."""


class MemoryBudgetError(ValueError):
    """A memory budget is too small for even one example; the message names the smallest budget that works."""


def _fail(name: str, accepted: str, value: Any) -> ArgumentError:
    return ArgumentError(f"{name}: expected {accepted}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` (not a bool, not a float) at least ``minimum``; ``None`` passes where allowed.

    Example::

        >>> check_int("num_candidates", 5)
        5
        >>> check_int("num_candidates", "5")
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.ArgumentError: num_candidates: expected an integer >= 1, got '5'
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        accepted = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
        raise _fail(name, accepted, value)
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` in the interval given (``low``/``high``, open or closed ends).

    Strings, bools, NaN and infinities are refused with the argument's name.

    Example::

        >>> check_number("damping", 0.01, low=0)
        0.01
        >>> check_number("lr", float("nan"), low=0, low_open=True)
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.ArgumentError: lr: expected a finite number > 0, got nan
    """
    if value is None and allow_none:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    accepted = "a finite number" + (" " + " and ".join(bounds) if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _fail(name, accepted, value)
    number = float(value)
    if low is not None and (number < low or (low_open and number == low)):
        raise _fail(name, accepted, value)
    if high is not None and (number > high or (high_open and number == high)):
        raise _fail(name, accepted, value)
    return number


def check_choice(name: str, value: Any, accepted: Sequence[T]) -> T:
    """``value`` if it is one of ``accepted``.

    Example::

        >>> check_choice("parallel", "test", ("test", "repeats"))
        'test'
    """
    try:
        if value in accepted:
            return value
    except TypeError:  # an unhashable value against a set
        pass
    raise _fail(name, f"one of {list(accepted)}", value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def check_path(name: str, value: Any, *, allow_none: bool = False) -> str | None:
    """``value`` as a non-empty path string (``str`` or ``os.PathLike``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail(name, "a directory path" + (" or None" if allow_none else ""), value)
    return os.fspath(value)
