"""Charts: pyplot on the Agg backend or None without matplotlib, and figures saved atomically and closed."""

from __future__ import annotations

import sys

import pytest

from asu.charts import load_pyplot, save_figure


def test_a_saved_figure_is_a_png_and_is_closed(tmp_path):
    plt = load_pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, ax = plt.subplots()
    ax.bar([0, 1], [0.2, 0.8])
    save_figure(fig, tmp_path / "sub" / "chart.png", dpi=50)
    assert (tmp_path / "sub" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["chart.png"]  # no temporary file left


def test_without_matplotlib_there_is_no_chart_and_a_note_unless_quiet(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert load_pyplot() is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert load_pyplot(quiet=True) is None
    assert capsys.readouterr().err == ""
