"""Charts written beside results: matplotlib on its file-only Agg backend, saved atomically.

matplotlib is a dependency; where it cannot be imported :func:`load_pyplot` returns None and the caller skips
its chart.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from asu.files import atomic_write

__all__ = ["load_pyplot", "save_figure"]


def load_pyplot(quiet: bool = False) -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None when matplotlib is not installed
    (saying so on stderr unless ``quiet``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no chart", file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int) -> None:
    """Lay ``fig`` out tightly, write it to ``path`` atomically (format from the suffix) and close it, also
    when writing fails (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
