"""Sampling parameters: the one declaration of each parameter's range, and the error that names a parameter.

Owns
----
* :class:`ParamError` (a ``ValueError``) and :class:`ParamTypeError` (also a ``TypeError``): every bad parameter
  value in the package raises one of them, with the parameter's name in ``.param`` (so callers such as the HTTP
  server name the field without reading the message) and as the message's first word (``"top_p: must be in
  (0, 1], got 1.5"``).
* :data:`RANGES`: each sampling parameter's type and allowed range, read by
  :class:`~rast_kernels.engine.SamplingParams`, by :func:`~rast_kernels.rast_sample`'s checks of number
  arguments and by the server's request models (:meth:`Range.pydantic_bounds`). A range is declared here and
  nowhere else.

Imports nothing from the package (the ops, the engine and the server all read it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ParamError(ValueError):
    """A parameter's value is out of range or malformed; ``param`` names it (``"alpha"``, ``"alpha[1]"``, ...)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class ParamTypeError(ParamError, TypeError):
    """A parameter has the wrong type (caught as ``TypeError`` or as :class:`ParamError`)."""


@dataclass(frozen=True)
class Range:
    """One parameter's declaration: ``kind`` ``"float"`` (any real, stored as float) or ``"int"`` (integral),
    bounds ``low`` / ``high`` (None: unbounded), open or closed; floats must be finite unless ``finite`` is off."""

    name: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True
    meaning: str = ""

    def describe(self) -> str:
        """The range in words: ``"in (0, 1]"``, ``">= 0"``, ``"an int64"``, ``"finite"``."""
        if self.kind == "int" and (self.low, self.high) == (INT64_MIN, INT64_MAX):
            return "an int64"
        if self.low is not None and self.high is not None:
            hi = "2**63" if self.high == 2**63 else self.high
            return f"in {'(' if self.low_open else '['}{self.low}, {hi}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return "finite" if self.finite else "a number"

    def contains(self, v) -> bool:
        """Whether the number ``v`` is in range (no type check)."""
        if self.kind == "float" and self.finite and not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True

    def check(self, value, name: Optional[str] = None):
        """``value`` as an int or float if it is a number of this kind in range, else :class:`ParamTypeError` /
        :class:`ParamError` naming ``name`` (default: this parameter's name)."""
        name = name or self.name
        integral = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ParamTypeError(name, f"expected {'an int' if integral else 'a number'}, got {type(value).__name__}")
        if integral and not isinstance(value, numbers.Integral):
            raise ParamTypeError(name, f"expected an int, got {value!r}")
        if not self.contains(value):
            raise ParamError(name, f"must be {self.describe()}, got {value!r}")
        return int(value) if integral else float(value)

    def pydantic_bounds(self) -> dict:
        """Keyword bounds for ``pydantic.Field`` (``ge`` / ``gt`` / ``le`` / ``lt``), so a request schema publishes
        the same range."""
        out = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["lt" if self.high_open else "le"] = self.high
        return out


def _ranges(*rs: Range) -> Dict[str, Range]:
    return {r.name: r for r in rs}


RANGES: Dict[str, Range] = _ranges(
    Range("alpha", "float", meaning="weight of an expert pair's delta"),
    Range("temperature", "float", low=0, meaning="0 is greedy"),
    Range("top_k", "int", low=0, high=2**63, high_open=True, meaning="0 is off; k >= the vocabulary keeps all"),
    Range("top_p", "float", low=0, high=1, low_open=True, meaning="1 is off"),
    Range("min_p", "float", low=0, high=1, meaning="0 is off"),
    Range("base_plausibility", "float", low=0, high=1, meaning="0 is off"),
    Range("max_new_tokens", "int", low=1, meaning="tokens to generate at most per sample"),
    Range("n", "int", low=1, meaning="samples of the prompt"),
    Range("seed", "int", low=INT64_MIN, high=INT64_MAX, meaning="the request's Philox seed"),
    Range("offset", "int", low=INT64_MIN, high=INT64_MAX, meaning="the sampler's Philox offset"),
)
"""Every sampling parameter's declaration, by name."""


def check_param(name: str, value, label: Optional[str] = None):
    """``RANGES[name].check(value, label)``: the checked number, or a :class:`ParamError` naming ``label``."""
    return RANGES[name].check(value, label)
