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


def _drawn(monkeypatch, points, **kwargs):
    """The figure :func:`tradeoff_chart` would save, kept open for inspection."""
    import asu.charts as charts

    figures = []
    monkeypatch.setattr(charts, "save_figure", lambda fig, path, dpi: figures.append(fig))
    assert charts.tradeoff_chart(points, "unused.png", "t", **kwargs)
    return figures[0].axes[0]


def test_the_tradeoff_chart_marks_the_references_and_degenerate_runs(monkeypatch, tmp_path):
    from asu.charts import TradeoffPoint, tradeoff_chart

    plt = load_pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    points = [
        TradeoffPoint("original", 0.97, 0.96, "original"),
        TradeoffPoint("oracle (retain only)", 0.28, 0.98, "oracle"),
        TradeoffPoint("ASU", 0.52, 0.86, "main", note="τ=3.7", forget_err=0.02, retain_err=0.01),
        TradeoffPoint("GA+GD", 0.63, 0.89, note="5e-4"),
        TradeoffPoint("GA+GD", 0.10, 0.40, note="2e-3", degenerate=0.8),
    ]
    ax = _drawn(monkeypatch, points, behind={"GA+GD": [(0.2, 0.5), (0.3, 0.6)]})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "original",
        "oracle (retain only)",
        "ASU",
        "GA+GD",
    ]
    notes = sorted(t.get_text() for t in ax.texts)
    assert notes == ["2e-3 (80% degenerate)", "5e-4", "τ=3.7"]
    verticals = [line.get_xdata()[0] for line in ax.lines if list(line.get_xdata()) == [0.28, 0.28]]
    horizontals = [line.get_ydata()[0] for line in ax.lines if list(line.get_ydata()) == [0.96, 0.96]]
    assert verticals == [0.28] and horizontals == [0.96]  # the oracle's forget, the original's retain
    scatters = [c for c in ax.collections if hasattr(c, "get_sizes")]
    rings = [c for c in scatters if c.get_sizes().tolist() == [260]]
    assert len(rings) == 1 and rings[0].get_offsets().tolist() == [[0.10, 0.40]]
    faint = [c for c in scatters if c.get_sizes().tolist() == [10]]
    assert len(faint) == 1 and faint[0].get_offsets().tolist() == [[0.2, 0.5], [0.3, 0.6]]
    assert ax.get_ylim()[0] == pytest.approx(0.28)  # 0.1 below the lowest point, rounded down, less 0.02
    plt.close("all")
    monkeypatch.undo()
    assert (
        tradeoff_chart(points, tmp_path / "t.png", "t")
        and (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    )
    assert not tradeoff_chart([], tmp_path / "none.png", "t") and not (tmp_path / "none.png").exists()
