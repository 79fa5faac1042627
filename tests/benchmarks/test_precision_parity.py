"""The bf16/float32 parity script: its arithmetic and its refusals (the long run is not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import precision_parity as pp

CKPT = Path(__file__).resolve().parents[2] / "checkpoints"
NETS = ["--classifier", str(CKPT / "resnet20_at.pt"), "--head", str(CKPT / "resnet20_at_head.pt")]


def test_paired_differences_and_agreements():
    y = torch.zeros(10, dtype=torch.long)
    preds = {
        "fp32": torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),  # 6 right
        "bf16": torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 1, 1]),  # 6 right, 2 discordant
        "fp32_seed2": torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2]),  # 8 right
    }
    s = pp.summarize(y, preds)
    assert s["accuracy"]["fp32"]["value"] == 0.6 and s["accuracy"]["fp32_seed2"]["value"] == 0.8
    bf16, seed = s["paired"]
    assert (bf16["a"], bf16["b"], bf16["difference"], bf16["only_a"], bf16["only_b"]) == (
        "bf16", "fp32", 0.0, 1, 1,
    )  # fmt: skip
    assert bf16["ci95"][0] < 0 < bf16["ci95"][1]
    assert seed["difference"] == pytest.approx(0.2) and (seed["only_a"], seed["only_b"]) == (2, 0)
    assert s["agreement"]["bf16/fp32"]["value"] == 0.8
    assert s["agreement"]["fp32_seed2/fp32"]["value"] == 0.7  # index 9 predicts another class
    lo, hi = s["agreement"]["bf16/fp32"]["ci95"]
    assert lo < 0.8 < hi


@pytest.mark.parametrize(
    "args,words",
    [(["--batch-size", "1"], "--batch-size"), (["--views", "1"], "--views"),
     (["--n", "17", "--batch-size", "8"], "batch of one"), (["--head", "nope.pt"], "nope.pt")],
)  # fmt: skip
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as err:
        pp.main([*NETS, *args, "--out", str(tmp_path / "out")])
    msg = capsys.readouterr().err
    assert err.value.code == 2 and words in msg and msg.count("\n") == 1


def test_a_used_output_folder_and_missing_data_are_refused_before_any_work(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "parity.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        pp.main([*NETS, "--out", str(used)])
    assert err.value.code == 2 and "not empty" in capsys.readouterr().err
    assert (used / "parity.json").read_text() == "{}"
    code = pp.main([*NETS, "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert code == 2 and "CIFAR-10 not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
