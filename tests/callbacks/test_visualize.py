"""Grid helpers shared by the attack and the defense."""

import torch

from revlit.callbacks.visualize import (
    grid_tensor,
    log_grid_tensorboard,
    perturbation_to_image,
    save_grid_png,
)


def test_save_grid_png_writes_a_png(tmp_path):
    rows = [torch.rand(8, 3, 32, 32), torch.rand(5, 3, 32, 32), torch.rand(8, 1, 32, 32)]
    p = save_grid_png(rows, ["clean", "delta", "adv"], tmp_path / "sub" / "grid.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [q.name for q in (tmp_path / "sub").iterdir()] == ["grid.png"]


def test_log_grid_tensorboard_logs_one_image():
    logged = []

    class Exp:
        def add_image(self, tag, img, global_step=None):
            logged.append((tag, img.shape, global_step))

    class Logger:
        experiment = Exp()

    rows = [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)]
    assert log_grid_tensorboard(Logger(), "attack/x", rows, step=3)
    assert logged == [("attack/x", grid_tensor(rows).shape, 3)]
    assert grid_tensor(rows).shape[0] == 3
    assert not log_grid_tensorboard(None, "t", rows)


def test_perturbation_is_rescaled_to_be_visible():
    d = torch.zeros(2, 3, 4, 4)
    d[0, 0, 0, 0] = 0.01
    d[0, 1, 0, 0] = -0.005
    img = perturbation_to_image(d)
    assert img[0, 0, 0, 0] == 1.0 and img[0, 1, 0, 0] == 0.25 and (img[1] == 0.5).all()


def test_defense_grid_captions_say_the_truth_and_both_predictions(tmp_path):
    from revlit.callbacks.defense_viz import RIGHT, WRONG, prediction_captions

    label, before, after = torch.tensor([0, 3, 5]), torch.tensor([0, 9, 1]), torch.tensor([2, 3, 5])
    cols, caps = prediction_captions(label, before, after)
    assert cols == ["true airplane", "true cat", "true dog"]
    assert caps[0] == [("pred airplane", RIGHT), ("pred truck", WRONG), ("pred automobile", WRONG)]
    assert caps[1] is None  # the perturbation row
    assert caps[2] == [("pred bird", WRONG), ("pred cat", RIGHT), ("pred dog", RIGHT)]
    x = torch.rand(3, 3, 8, 8)
    path = save_grid_png([x, x, x], ["a", "b", "c"], tmp_path / "g.png", col_titles=cols,
                         captions=caps)  # fmt: skip
    assert path.stat().st_size > 0
