"""The README's demo runs end to end (a few steps) and learns something."""

import math

from fastlm import demo


def test_demo_runs_and_loss_falls(capsys):
    assert demo.main(["--steps", "40", "--eval-every", "40", "--width", "32", "--layers", "1"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    val = float(text.split("val loss ")[1].split(",")[0])
    assert val < math.log(90)  # better than uniform over the ~90 characters
    assert "sample:" in text
