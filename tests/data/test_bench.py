"""`fastlm bench data` end to end on a tiny corpus: the pipeline row, the kernels side by side
(fastlm's C++ against the Python reference and the tokenizers library), the plot."""

import json

from fastlm.cli import main


def test_bench_data_reports_pipeline_and_kernel_ratios(tmp_path, capsys):
    assert main(["bench", "data", "--mb", "0.3", "--vocab-size", "400", "--out", str(tmp_path),
                 "--name", "d"]) == 0
    rep = json.loads((tmp_path / "d.json").read_text())
    (row,) = rep["rows"]
    assert row["mb_per_s"] > 0 and row["tokens"] > 0 and row["s_tokenize"] >= 0
    assert 0 <= row["peak_gb"] < 2
    s = rep["summary"]
    for k in ("clean", "bpe"):
        assert s[f"{k}_speedup"] == s[f"{k}_mb_s_fastlm"] / s[f"{k}_mb_s_" +
                                                              ("python" if k == "clean" else "tokenizers")]
    assert (tmp_path / "d.png").stat().st_size > 0
    assert "kernels side by side" in capsys.readouterr().out


def test_bench_data_prepares_conversations_with_sft(tmp_path):
    """--sft: the synthetic documents as a question and its answer, through prepare --sft."""
    assert main(["bench", "data", "--sft", "--mb", "0.2", "--tokenizer", "byte", "--out",
                 str(tmp_path), "--name", "s"]) == 0
    (row,) = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert row["sft"] is True and row["docs_out"] == row["docs"] > 0
    # the chat template's markers and EOS come on top of the conversations' bytes
    assert row["tokens"] > row["raw_mb"] * 1e6
