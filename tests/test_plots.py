"""Each plot writes a real PNG, closes its figure and refuses mismatched inputs."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000  # more than an empty canvas header


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def test_plot_roc_lfw_writes_png_into_a_new_folder(tmp_path):
    fpr = np.linspace(0, 1, 50)
    tpr = np.sqrt(fpr)
    path = tmp_path / "plots" / "nested" / "roc.png"
    assert plots.plot_roc_lfw(fpr, tpr, 0.6667, path, title="ROC epoch 3") is None
    assert_png(path)


def test_plot_accuracy_lfw_with_and_without_stds(tmp_path):
    epochs = [1, 2, 3, 4]
    accuracies = [0.80, 0.85, 0.88, 0.90]
    plots.plot_accuracy_lfw(epochs, accuracies, tmp_path / "accuracy.png")
    plots.plot_accuracy_lfw(
        epochs, accuracies, str(tmp_path / "accuracy_std.png"), stds=[0.02, 0.01, 0.01, 0.01]
    )
    assert_png(tmp_path / "accuracy.png")
    assert_png(tmp_path / "accuracy_std.png")


def test_plot_training_loss_writes_png(tmp_path):
    plots.plot_training_loss(np.arange(1, 6), np.array([1.2, 0.9, 0.7, 0.6, 0.55]), tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")


@pytest.mark.parametrize(
    "call",
    [
        lambda path: plots.plot_roc_lfw([0, 0.5, 1], [0, 1], 0.5, path),
        lambda path: plots.plot_accuracy_lfw([1, 2, 3], [0.9, 0.9], path),
        lambda path: plots.plot_accuracy_lfw([1, 2], [0.9, 0.9], path, stds=[0.1]),
        lambda path: plots.plot_training_loss([1, 2], [[1.0, 2.0]], path),
    ],
)
def test_mismatched_inputs_raise_and_write_nothing(tmp_path, call):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="must"):
        call(path)
    assert not path.exists()


def test_save_error_propagates_and_still_closes_the_figure(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError):
        plots.plot_training_loss([1, 2], [1.0, 0.5], blocker / "loss.png")


@pytest.fixture
def drawn(monkeypatch):
    """The axes of each figure a plot function drew, caught as the figure is closed."""
    axes = []
    real_close = plt.close

    def catch(fig=None):
        axes.extend(fig.axes)
        real_close(fig)

    monkeypatch.setattr(plots.plt, "close", catch)
    return axes


def test_the_accuracy_plot_draws_each_target_at_its_epochs_and_the_std_band(tmp_path, drawn):
    stds = np.array([0.02, 0.01, 0.03])
    others = {"cfp_fp": ([2, 3], [0.70, 0.75]), "agedb_30": ([3], [0.66])}
    plots.plot_accuracy_lfw([1, 2, 3], [0.80, 0.85, 0.88], tmp_path / "a.png", stds=stds, others=others)
    (ax,) = drawn
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {
        "LFW accuracy": ([1, 2, 3], [0.80, 0.85, 0.88]),
        "cfp_fp accuracy": ([2, 3], [0.70, 0.75]),
        "agedb_30 accuracy": ([3], [0.66]),
    }
    (band,) = ax.collections  # fill_between: mean - std up to mean + std at every epoch
    vertices = band.get_paths()[0].vertices
    for epoch, mean, std in zip([1, 2, 3], [0.80, 0.85, 0.88], stds, strict=True):
        at_epoch = vertices[np.isclose(vertices[:, 0], epoch), 1]
        assert at_epoch.min() == pytest.approx(mean - std) and at_epoch.max() == pytest.approx(mean + std)
    assert sorted(text.get_text() for text in ax.get_legend().get_texts()) == sorted([*lines, "+-1 std"])
    assert ax.get_title() == "Verification accuracy per epoch"


def test_the_roc_plot_draws_the_curve_with_its_area_and_the_diagonal(tmp_path, drawn):
    fpr, tpr = np.linspace(0, 1, 5), np.sqrt(np.linspace(0, 1, 5))
    plots.plot_roc_lfw(fpr, tpr, 0.6667, tmp_path / "roc.png")
    (ax,) = drawn
    curve, diagonal = ax.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), fpr)
    np.testing.assert_array_equal(curve.get_ydata(), tpr)
    assert curve.get_label() == "ROC curve (area = 0.6667)"
    assert list(diagonal.get_xdata()) == [0, 1] == list(diagonal.get_ydata())
