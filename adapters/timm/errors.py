"""The errors of the timm adapter: each message says what went wrong and what to do."""

from __future__ import annotations

from typing import Sequence

from dcss_plugin.data import DataError

__all__ = ["TimmAdapterError", "UnknownModelError", "PretrainedWeightsError", "TimmInputError"]


class TimmAdapterError(ValueError):
    """A timm backbone could not be set up as asked (the message says why and what to do)."""


class UnknownModelError(TimmAdapterError):
    """``model_name`` is not a timm model; :attr:`suggestions` holds close names from ``timm.list_models()``.

    Example:
        >>> try:
        ...     resolve_model_name("resnet5O")
        ... except UnknownModelError as err:
        ...     err.suggestions[:1]
        ['resnet50']
    """

    def __init__(self, name: str, suggestions: Sequence[str]) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        hint = (f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions
                else " See timm.list_models('*pattern*') for the available names.")
        super().__init__(f"Unknown timm model {name!r}.{hint}")


class PretrainedWeightsError(TimmAdapterError):
    """Weights were asked from the hub (there is no network), or a weights file does not fit the model."""


class TimmInputError(DataError):
    """Images of the wrong rank, channel count or size for the backbone's data config."""
