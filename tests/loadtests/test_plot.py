"""The run's plot: readable when models have equal replica counts, legends clear of the data."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg

from loadtests.plot import MetricsSample, TimelinePoint, draw_run


def a_run() -> tuple[list[TimelinePoint], list[MetricsSample]]:
    timeline = [
        TimelinePoint(
            t=100.0 + i, users=5, requests=50 * i, failures=i // 4, p50_ms=3.0, p99_ms=9.0
        )
        for i in range(20)
    ]
    samples = [
        MetricsSample(
            t=100.0 + i,
            queue_depth={"digits": float(i % 5), "mlp": float(i % 3)},
            replicas={"digits": 2.0, "mlp": 2.0},  # equal counts: the lines must not merge
            requests={},
        )
        for i in range(20)
    ]
    return timeline, samples


def test_models_with_equal_replica_counts_get_distinct_lines() -> None:
    timeline, samples = a_run()
    figure = draw_run("run", timeline, samples, slo_p99_ms=50.0, arrival_rate=None)
    replicas_axis = figure.axes[-1]
    lines = {line.get_label(): set(line.get_ydata()) for line in replicas_axis.get_lines()}
    assert set(lines) == {"digits replicas", "mlp replicas"}
    assert lines["digits replicas"].isdisjoint(lines["mlp replicas"])
    assert all(abs(y - 2.0) < 0.1 for ys in lines.values() for y in ys)


def test_every_legend_lies_outside_the_panels() -> None:
    timeline, samples = a_run()
    for arrival_rate in (None, 40.0):
        figure = draw_run("run", timeline, samples, slo_p99_ms=50.0, arrival_rate=arrival_rate)
        FigureCanvasAgg(figure).draw()
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        panels = [axis.get_window_extent(renderer) for axis in figure.axes]
        legends = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
        assert len(legends) == 3  # load, latency, gateway
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(panel) for panel in panels), box
            assert box.x1 <= figure.bbox.x1  # and inside the picture


def test_a_schedules_offered_load_is_drawn_second_by_second() -> None:
    timeline, samples = a_run()
    figure = draw_run("run", timeline, samples, slo_p99_ms=50.0, arrival_rate=[25, 25, 100, 25])
    (offered,) = [
        line for line in figure.axes[0].get_lines() if line.get_label() == "offered (arrivals/s)"
    ]
    assert list(offered.get_ydata()) == [25, 25, 100, 25]
