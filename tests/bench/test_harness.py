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


def test_bench_attention_decoding_counts_the_visible_scores(tmp_path, capsys):
    from fastlm.bench.attention import flops

    argv = ["bench", "attention", "--query-len", "1", "--seqlens", "40", "--dtypes", "fp32",
            "--modes", "fwd", "--repeat", "2", "--impls", "fastlm_cpu,sdpa_flash,eager_math"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention_cpu.json").read_text())["rows"]
    assert {r["query_len"] for r in rows} == {1} and all(r.get("ms") for r in rows), rows
    # bottom-right causal: one query sees every key; sq == sk keeps FlashAttention's halving
    assert flops(1, 1, 1, 40, 64, True, "fwd") == flops(1, 1, 1, 40, 64, False, "fwd")
    assert flops(1, 1, 40, 40, 64, True, "fwd") == flops(1, 1, 40, 40, 64, False, "fwd") / 2
    assert flops(1, 1, 3, 10, 1, True, "fwd") == 4 * (8 + 9 + 10)


def test_paired_speedup_uses_each_rounds_fastest_peer():
    T = harness.Timing
    timings = {  # round 2 is slow for everyone (drift): a paired ratio does not mind
        "ours": T(10, 0, 0, 3, (10.0, 20.0, 10.0)),
        "a": T(11, 0, 0, 3, (11.0, 22.0, 13.0)),
        "b": T(12, 0, 0, 3, (12.0, 21.0, 12.0)),
    }
    assert harness.paired_speedup(timings, "ours", ["a", "b"]) == pytest.approx(1.1)
    assert harness.paired_speedup(timings, "missing", ["a"]) is None


def test_bench_adamw_scenarios(tmp_path, capsys):
    """Both scenarios run; each row says what it moves and is compared within its scenario;
    the bf16-moment variant is compared against the fp32 peers' plain step."""
    argv = ["bench", "adamw", "--sizes", "0.02", "--repeat", "2",
            "--impls", "fastlm_cpu,fastlm_cpu_bf16m,torch_fused", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "adamw_cpu.json").read_text())
    got = {(r["impl"], r["scenario"]): r for r in data["rows"]}
    assert set(got) == {("fastlm_cpu", "step"), ("fastlm_cpu_bf16m", "step"),
                        ("torch_fused", "step"), ("fastlm_cpu", "clip+step"),
                        ("torch_fused", "clip+step")}
    assert [got[k]["bytes_per_param"] for k in sorted(got)] == [32, 28, 20, 40, 28]
    for (_impl, scenario), r in got.items():
        peer = got[("torch_fused", scenario)]["ms"]
        assert r["vs_best_peer"] == pytest.approx(peer / r["ms"])
    assert data["ceilings"]["update_gbs"] > 0
    assert cli.main(["bench", "adamw", "--scenarios", "clip"]) != 0
    assert "--scenarios 'clip': choose from step, clip+step" in capsys.readouterr().err


def test_bench_adamw_moments_tiny(tmp_path):
    """Both moment dtypes train (same batches), the held-out losses and the moment memory are
    reported (bf16: half of fp32's), a bad --text names the problem."""
    argv = ["bench", "adamw-moments", "--steps", "3", "--batch", "2", "--block", "16",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "adamw_moments.json").read_text())
    s = data["summary"]
    assert s["moment_mb_bfloat16"] == pytest.approx(s["moment_mb_float32"] / 2)
    assert 0 < s["val_loss_float32"] < 6 and 0 < s["val_loss_bfloat16"] < 6
    assert {r["moments"] for r in data["rows"]} == {"float32", "bfloat16"}
    assert (tmp_path / "adamw_moments.png").exists()
    assert cli.main(["bench", "adamw-moments", "--text", str(tmp_path / "missing.txt")]) != 0


def test_bench_model_all_types_tiny(tmp_path, monkeypatch):
    """Every supported model type builds, is patched and takes a training step in the bench
    (tiny dims here; the bench's own sizes are for measuring)."""
    from fastlm.bench import model as bm

    tiny = {k: dict(v) for k, v in bm.SIZES.items()}
    for v in tiny.values():
        for key in ("hidden_size", "n_embd", "word_embed_proj_dim"):
            if key in v:
                v[key] = 32
        for key in ("intermediate_size", "ffn_dim"):
            if key in v:
                v[key] = 64
        for key in ("num_hidden_layers", "n_layer"):
            if key in v:
                v[key] = 1
        if "head_dim" in v:
            v["head_dim"] = 8
        if "rotary_dim" in v:  # GPT-J: within the head (32 / 8 heads)
            v["rotary_dim"] = 4
        v["vocab_size"] = 64
    monkeypatch.setattr(bm, "SIZES", tiny)
    argv = ["bench", "model", "--model-type", "all", "--seqlens", "9", "--batch", "1",
            "--repeat", "1", "--min-seconds", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "model_all_cpu.json").read_text())["rows"]
    # transformers refuses SDPA for Gemma 2 and GPT-OSS: no row, said so
    no_sdpa = {("gemma2", "sdpa"), ("gpt_oss", "sdpa")}
    assert {(r["model"], r["impl"]) for r in rows} == \
        {(k, i) for k in tiny for i in bm.IMPLS} - no_sdpa
    assert all(r["ms"] > 0 and r["vs_best_peer"] > 0 for r in rows)
    assert (tmp_path / "model_all_cpu.png").exists()
    assert cli.main(["bench", "model", "--model-type", "llama,t5"]) == 2  # names the bad type


def test_time_interleaved_alternates_and_rotates():
    order = []
    fns = {name: (lambda i, n=name: order.append((n, i))) for name in "abc"}
    timings, peaks = harness.time_interleaved(fns, warmup=1, repeat=3)
    assert order[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up, one each
    assert [n for n, _ in order[3:]] == list("abc" "bca" "cab")  # rotated rounds
    assert all(t.n == 3 for t in timings.values()) and peaks == dict.fromkeys("abc")


@pytest.mark.parametrize("flags, level", [
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, "avx512_bf16"), ({"avx2", "fma", "avx512f"}, "avx512"),
    ({"avx2", "fma"}, "avx2"), (set(), "scalar")])
def test_results_name_the_cpu_vector_level(monkeypatch, flags, level):
    import fastlm._build as build

    monkeypatch.setattr(build, "cpu_features", lambda: frozenset(flags))
    assert harness.cpu_simd_level() == level
    assert harness.environment("cpu")["device"].endswith(f"cores, {level})")


def test_cpu_peak_counts_what_a_call_allocates():
    """The process's peak resident memory above its level before the call (Linux): a call
    that touches 256 MiB and frees it reports ~256 MiB, a call that allocates nothing ~0, and
    time_interleaved's cpu_memory measures each implementation so."""
    import sys

    import torch

    if not sys.platform.startswith("linux"):
        pytest.skip("the peak comes from Linux's /proc/self")
    big = harness.cpu_peak_gb(lambda: torch.ones(64, 2**20).sum())
    small = harness.cpu_peak_gb(lambda: None)
    assert 0.24 < big < 0.30 and small < 0.01
    fns = {"big": lambda i: torch.ones(32, 2**20).sum(), "none": lambda i: None}
    _, peaks = harness.time_interleaved(fns, warmup=0, repeat=1, cpu_memory=True)
    assert 0.12 < peaks["big"] < 0.15 and peaks["none"] < 0.01
