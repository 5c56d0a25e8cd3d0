"""The diagram helpers of dinolab.viz: geometry of the anchors, the slide size, refusals that change nothing."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dinolab import viz  # noqa: E402


def test_canvas_fills_a_16_9_slide():
    viz.use_style()
    fig, ax = viz.diagram_canvas()
    w, h = fig.get_size_inches() * fig.dpi
    assert (round(w), round(h)) == (1280, 720)
    assert ax.get_xlim() == (0, 128) and ax.get_ylim() == (0, 72)
    plt.close(fig)
    with pytest.raises(ValueError, match="positive"):
        viz.diagram_canvas(0, 72)


def test_box_anchors_and_fill():
    fig, ax = viz.diagram_canvas()
    a = viz.diagram_box(ax, 40, 30, 20, 8, "x", "blue")
    assert a == {"t": (40, 34), "b": (40, 26), "l": (30, 30), "r": (50, 30)}
    (patch,) = ax.patches
    assert matplotlib.colors.to_hex(patch.get_facecolor()) == viz.DIAGRAM_FILLS["blue"]
    bbox = patch.get_bbox()
    assert (bbox.x0, bbox.y0, bbox.width, bbox.height) == (30, 26, 20, 8)
    assert ax.texts[0].get_position() == (40, 30)
    plt.close(fig)


def test_bad_input_is_refused_and_draws_nothing():
    fig, ax = viz.diagram_canvas()
    with pytest.raises(ValueError, match="positive size"):
        viz.diagram_box(ax, 10, 10, -1, 5, "x")
    with pytest.raises(ValueError, match="below the series' minimum"):
        viz.diagram_box(ax, 10, 10, 5, 5, "x", fontsize=8)
    with pytest.raises(ValueError, match="below the series' minimum"):
        viz.diagram_arrow(ax, (0, 0), (10, 0), label="y", fontsize=7)
    assert not ax.patches and not ax.texts  # the annotate of an arrow would be a text too
    plt.close(fig)


def test_arrow_label_sits_along_the_arrow():
    fig, ax = viz.diagram_canvas()
    assert viz.diagram_arrow(ax, (0, 0), (10, 20)) is None
    t = viz.diagram_arrow(ax, (0, 0), (10, 20), label="[B, N, D]", label_at=0.25, dx=1, dy=0)
    assert t.get_position() == (3.5, 5.0) and t.get_text() == "[B, N, D]"
    plt.close(fig)


def test_shape_label():
    import torch

    assert viz.shape_label(torch.zeros(2, 192, 8, 8)) == "[2, 192, 8, 8]"
    assert viz.shape_label(torch.Size([3])) == "[3]"
    assert viz.shape_label((2, "H_l", 4)) == "[2, H_l, 4]"
