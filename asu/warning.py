"""The warning categories of the project, so that callers (and the test suite) can single out asu's warnings.

Every warning ``asu`` issues is an :class:`AsuWarning`; deprecations are :class:`AsuDeprecationWarning`, a
``FutureWarning`` so that command-line users see it (Python hides plain ``DeprecationWarning`` outside
``__main__``). The test suite turns both into errors (``pyproject.toml``'s ``filterwarnings``): a test that
expects one says so with ``pytest.warns``.
"""

from __future__ import annotations

__all__ = ["AsuDeprecationWarning", "AsuWarning"]


class AsuWarning(UserWarning):
    """A warning issued by asu: a fallback taken, a setting that may not do what was meant."""


class AsuDeprecationWarning(AsuWarning, FutureWarning):
    """A name or option of asu that still works and will go: the message names its replacement."""
