"""Errors with a message that says what went wrong, why, and how to fix it (the CLI prints them as one line).

All are ``ValueError`` subclasses, so code that catches ``ValueError`` keeps working. This module imports nothing
heavy (no torch, no numpy), so torch-free code such as :mod:`dcss_plugin.export.runtime` can raise them too.
"""

from __future__ import annotations

import re

__all__ = ["DataError", "TrainingDivergedError", "describe_load_error"]


class DataError(ValueError):
    """Input data that DCSS cannot use; the message says what, why and how to fix it.

    Also importable as ``dcss_plugin.data.DataError`` and ``dcss_plugin.DataError`` (the same class).
    """


class TrainingDivergedError(ValueError):
    """A training loss became NaN or inf (the optimizer diverged); ``phase`` names the phase, ``batch`` the batch of
    the epoch and ``lr`` the learning rate in use.

    Example:
        >>> try:
        ...     DCSS(4, lr=1e6).fit(x)
        ... except TrainingDivergedError as exc:
        ...     print(exc.phase, exc.lr)
    """

    def __init__(self, phase: str, batch: int, value: float, lr: float | None = None) -> None:
        self.phase, self.batch, self.value, self.lr = phase, int(batch), float(value), lr
        at = f"lr={lr:g}" if lr is not None else "the learning rate"
        super().__init__(
            f"Training diverged in {phase}: the loss became {value} at batch {batch + 1} of an epoch. The optimizer "
            f"steps are too large for this data ({at}); lower lr (e.g. by 10x) and fit again."
        )


_ADVICE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def describe_load_error(exc: BaseException) -> str:
    """The reason ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry with
    ``weights_only=False`` (which would run code from the file): for a pickled Python object, its type.

    Example:
        >>> describe_load_error(exc)
        'it holds a Python object of type __main__.Foo (only tensors and plain config are read; code is never run)'
    """
    text = str(exc)
    found = _ADVICE.search(text)
    if found:
        return (f"it holds a Python object of type {found.group(1)} (only tensors and plain config are read; code in "
                "a file is never run)")
    if "weights_only" in text or "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines()
                 if ln.strip() and "weights_only" not in ln and "Weights only load failed" not in ln
                 and "add_safe_globals" not in ln and "documentation of torch.load" not in ln]
        detail = lines[0] if lines else "it holds something other than tensors and plain config"
        return f"{detail} (only tensors and plain config are read; code in a file is never run)"
    return text.splitlines()[0] if text else type(exc).__name__
