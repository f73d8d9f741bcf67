"""The benchmark harness and the `fastlm bench` commands (tiny sizes: correctness, not speed)."""

import json

import pytest

from fastlm import cli
from fastlm.bench import harness


def test_time_fn_counts_calls_and_orders_quantiles():
    calls = []
    t = harness.time_fn(lambda i: calls.append(i), warmup=2, repeat=5)
    assert len(calls) == 7 and calls[:2] == [0, 1]  # warm-up uses the first rotating inputs
    assert t.n == 5 and t.p20_ms <= t.median_ms <= t.p80_ms


def test_speedup_against_fastest_peer_per_group():
    r = harness.Report("x", "cmd", "cpu")
    for impl, size, ms in [("ours", 1, 2.0), ("a", 1, 4.0), ("b", 1, 3.0), ("ours", 2, 5.0),
                           ("a", 2, None)]:
        r.add(impl=impl, size=size, ms=ms)
    harness.add_speedup(r, "speedup", ("size",), lambda row: row["impl"] != "ours")
    assert [row["speedup"] for row in r.rows] == [1.5, 0.75, 1.0, None, None]


def test_report_files_and_plot(tmp_path):
    r = harness.Report("demo", "fastlm bench demo", "cpu", env=harness.environment("cpu"))
    r.ceilings["x"] = 1.0
    for impl in ("a", "b"):
        for n in (1, 2, 4):
            r.add(impl=impl, n=n, ms=float(n), case="c")
    paths = r.write(tmp_path)
    png = harness.plot(r, tmp_path / "demo.png", x="n", y="ms", series="impl", facet="case")
    assert json.loads(paths[0].read_text())["rows"][0]["impl"] == "a"
    md = paths[1].read_text()
    assert "Command: `fastlm bench demo`" in md and "| impl" in md
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no leftovers


@pytest.mark.parametrize("argv", [
    ["bench", "attention", "--seqlens", "33", "--dtypes", "fp32", "--repeat", "2",
     "--impls", "fastlm_cpu,sdpa_flash"],
    ["bench", "adamw", "--sizes", "0.05", "--repeat", "2", "--impls", "fastlm_cpu,torch_fused"],
])
def test_bench_commands_write_results(argv, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    name = argv[1]
    rows = json.loads((tmp_path / f"{name}_cpu.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == set(argv[argv.index("--impls") + 1].split(","))
    assert all(r.get("ms") for r in rows), rows
    assert (tmp_path / f"{name}_cpu.png").exists()
