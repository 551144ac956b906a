"""Checks of configured operator steps, run when the configuration loads (not per study).

A step names an operator of :data:`medpipe.ops.FILTERS` or :data:`medpipe.ops.SEGMENTERS`
and gives keyword parameters. :func:`check_step` looks the operator up, checks the parameter
names against its signature (``inspect.signature(...).bind``), the values of the parameters
that share a name across the package (``size``, ``sigma``, ``mode``, ...) against one table,
and finally runs a filter once on a tiny volume so that the operator's own argument checks
(``window``'s ``high > low``, ``median``'s ``size`` or ``footprint``) speak at load time too.

>>> check_step("filter", "median", {"size": 3}, "filters.pipelines.CT[0]")
>>> check_step("filter", "medain", {}, "filters.pipelines.CT[0]")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: filters.pipelines.CT[0]: unknown operator 'medain' (known: anisotropic_diffusion, gaussian, ...)
>>> check_step("filter", "median", {"sise": 3}, "filters.pipelines.CT[0]")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: filters.pipelines.CT[0] (median): unexpected parameter 'sise' (accepted: size, footprint, mode, cval)
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["check_step", "STAGE_ARGUMENTS"]

NDIM = 3  # the stages filter and segment (z, y, x) volumes
MODES = ("reflect", "constant", "nearest", "mirror", "wrap", "grid-constant", "grid-mirror", "grid-wrap")
# Arguments the segment stage passes itself: a configuration may not set them.
STAGE_ARGUMENTS = {
    "ct_tissues": {"raw", "spacing", "affine", "lesion_min_ml", "lesion_max_ml"},
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_axis(ok: Callable[[Any], bool], scalar_ok: Callable[[Any], bool] | None = None) -> Callable[[Any], bool]:
    """A scalar passing ``scalar_ok`` (default ``ok``), or ``NDIM`` values each passing ``ok``."""
    def check(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return len(v) == NDIM and all(ok(x) for x in v)
        return (scalar_ok or ok)(v)
    return check


# Parameter name -> (check, what is expected). Names mean the same in every operator.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sigma": (_per_axis(lambda x: _number(x) and x >= 0, lambda x: _number(x) and x > 0),
              f"a number > 0 or {NDIM} numbers >= 0"),
    "size": (_per_axis(lambda x: _integer(x) and x >= 1), f"an integer >= 1 or {NDIM} integers >= 1"),
    "truncate": (lambda v: _number(v) and v > 0, "a number > 0"),
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "cval": (_number, "a number"),
    "order": (_per_axis(lambda x: _integer(x) and 0 <= x <= 3), f"an integer 0-3 or {NDIM} of them"),
    "niter": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "kappa": (lambda v: _number(v) and v > 0, "a number > 0"),
    "amount": (_number, "a number"),
    "low": (_number, "a number"),
    "high": (_number, "a number"),
    "nbins": (lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    "body_threshold": (_number, "a number"),
    "lesion_threshold": (_number, "a number"),
    "mask_threshold": (lambda v: v is None or _number(v), "a number or null"),
}


def _registry(kind: str) -> dict[str, Callable[..., Any]]:
    from . import FILTERS, SEGMENTERS

    return FILTERS if kind == "filter" else SEGMENTERS


def check_step(kind: str, op: str, params: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when the step cannot run.

    Parameters
    ----------
    kind : {"filter", "segment"}
        Which registry ``op`` belongs to.
    op : str
        Operator (filter) or method (segmentation) name.
    params : dict
        Keyword parameters of the step.
    where : str
        The step's place in the configuration, e.g. ``filters.pipelines.CT[0]``.
    """
    try:
        _check_cached(kind, op, json.dumps(params, sort_keys=True, default=repr))
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None
    except TypeError:  # parameters JSON cannot hold (only from Python callers): check uncached
        _check(kind, op, params)


@functools.lru_cache(maxsize=256)
def _check_cached(kind: str, op: str, params_json: str) -> None:
    _check(kind, op, json.loads(params_json))


def _check(kind: str, op: str, params: dict[str, Any]) -> None:
    """Raise ``ValueError`` with the message after the step's place (``": ..."`` or ``" (op): ..."``)."""
    registry = _registry(kind)
    noun = "operator" if kind == "filter" else "method"
    if op not in registry:
        hint = " (resample changes the shape: a library function, not a pipeline step)" if op == "resample" else ""
        raise ValueError(f": unknown {noun} {op!r}{hint} (known: {', '.join(sorted(registry))})")
    func = registry[op]
    sig = inspect.signature(func)
    names = list(sig.parameters)
    image, supplied = names[0], STAGE_ARGUMENTS.get(op, set())
    accepted = [n for n in names[1:] if n not in supplied]
    for name in params:
        if name in supplied or name == image:
            raise ValueError(f" ({op}): parameter {name!r} is set by the pipeline, not the configuration")
        if name not in accepted:
            raise ValueError(f" ({op}): unexpected parameter {name!r} (accepted: {', '.join(accepted)})")
    try:
        sig.bind(None, **{n: None for n in supplied}, **params)
    except TypeError as exc:  # a required parameter is missing
        raise ValueError(f" ({op}): {exc}") from None
    for name, value in params.items():
        ok, expected = _RULES.get(name, (None, ""))
        if ok is not None and not ok(value):
            raise ValueError(f" ({op}): parameter {name!r} must be {expected}, got {value!r}")
    if kind == "filter":
        _dry_run(func, op, params)
    elif op == "ct_tissues" and params.get("presets") is not None:
        _check_presets(params["presets"])
    elif op == "brain_tissues" and params.get("method", "kmeans") not in ("kmeans", "multiotsu"):
        raise ValueError(f" ({op}): parameter 'method' must be 'kmeans' or 'multiotsu', got {params['method']!r}")


def _dry_run(func: Callable[..., Any], op: str, params: dict[str, Any]) -> None:
    """The operator's own argument checks, on a tiny NumPy volume (microseconds)."""
    tiny = np.linspace(0.0, 1.0, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    try:
        func(tiny, **params)
    except (TypeError, ValueError, RuntimeError) as exc:  # SciPy says RuntimeError for a bad mode
        raise ValueError(f" ({op}): {exc}") from None


def _check_presets(presets: Any) -> None:
    from .segment import CT_PRESETS

    if not isinstance(presets, dict):
        raise ValueError(f" (ct_tissues): parameter 'presets' must map tissue names to [low, high], got {presets!r}")
    for name, pair in presets.items():
        if name not in CT_PRESETS:
            raise ValueError(f" (ct_tissues): presets: unknown tissue {name!r} (known: {', '.join(CT_PRESETS)})")
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair) and pair[1] > pair[0]):
            raise ValueError(f" (ct_tissues): presets.{name} must be [low, high] with high > low, got {pair!r}")
