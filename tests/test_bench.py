"""bench.run at tiny sizes: every row present with positive rates; --append adds a dated section.

diffusers is the `bench` extra: without it these tests skip, and under CI=true they fail."""
import importlib.util
import json

import pytest

from tests.conftest import make_shards, skip_or_fail

EXPECTED = [
    "roofline fp32 GEMM", "roofline fp32 3x3 conv", "roofline bf16 GEMM", "roofline bf16 3x3 conv",
    "training vs diffusers fp32", "training vs diffusers bf16",
    "DIP vs plain one-net loop",
    "DDPM step vs diffusers fp32", "DDPM T=1000 vs diffusers fp32", "DDIM vs diffusers fp32",
    "prior precompute job vs plain one-net loop",
]
KEYS = {"name", "unit", "ours", "baseline", "ratio", "gflops", "peak_gflops", "settings"}


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory, one_thread):
    if importlib.util.find_spec("diffusers") is None:
        skip_or_fail('diffusers is not installed: pip install -c constraints.txt -e ".[bench]"')
    from bench.run import main

    tmp = tmp_path_factory.mktemp("bench")
    data = make_shards(tmp, 4, 8, 8)
    md = tmp / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nearlier text\n")
    rows = main(["--preset", "tiny", "--device", "cpu", "--data", str(data),
                 "--out", str(tmp / "rows.json"), "--append", str(md)])
    return rows, tmp


def test_rows_have_positive_rates_and_percent_of_peak(bench_result):
    rows, tmp = bench_result
    assert [r.name for r in rows] == EXPECTED
    peaks = {r.name: r.ours for r in rows if r.name.startswith("roofline")}
    for r in rows:
        assert r.ours > 0 and r.gflops > 0 and r.peak_gflops > 0, r
        assert r.peak_gflops in peaks.values(), r  # every % is against a measured roofline row
        if not r.name.startswith("roofline"):
            assert r.baseline > 0 and r.ratio > 0, r
            assert r.peak_gflops in (peaks["roofline fp32 3x3 conv"],
                                     peaks["roofline bf16 3x3 conv"]), r
    by = {r.name: r for r in rows}
    step, full = by["DDPM step vs diffusers fp32"], by["DDPM T=1000 vs diffusers fp32"]
    # images/s of the T=1000 chain follows from ms/step: batch 4 / (ms * 1000 / 1000)
    assert full.ours == pytest.approx(4 / step.ours)
    assert step.ratio == pytest.approx(step.baseline / step.ours)
    # GFLOP/s = images/s x FLOPs per image: the U-Net's forward from torch's FlopCounterMode
    from bench.roofline import unet_flops
    assert step.gflops == pytest.approx(4 / (step.ours / 1e3) * unet_flops("unet-tiny", "ours",
                                                                             False) / 1e9)
    saved = json.loads((tmp / "rows.json").read_text())
    assert isinstance(saved, list) and [r["name"] for r in saved] == EXPECTED
    for r in saved:
        assert KEYS <= set(r) and r["commit"] and r["preset"] == "tiny"
    assert saved[0]["pct_of_peak"] == pytest.approx(100.0)


def test_append_adds_a_dated_section(bench_result):
    _, tmp = bench_result
    text = (tmp / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n\n### ")
    meta = [line for line in text.splitlines() if line.startswith("device: ")]
    assert len(meta) == 1
    assert "date: 20" in meta[0] and " UTC; commit: " in meta[0] and "CPU" in meta[0]
    table = [line for line in text.splitlines()
             if line.startswith("| ") and not line.startswith(("| name", "|---"))]
    assert len(table) == len(EXPECTED)
    assert all("% (" in line for line in table)  # the % of peak column is filled


LEVERS = ["training unet-tiny b4, channels_last", "training unet-tiny b4, optimizer_impl=fused",
          "training unet-tiny b4, bf16 autocast", "DIP, grouped fp32 vs plain one-net loop",
          "DIP, bmm fp32 vs plain one-net loop", "DIP, loop fp32 vs plain one-net loop",
          "DIP, grouped bf16 vs grouped fp32",
          "DIP two cores, two stacks in two processes vs 1 thread",
          "DDPM step unet-tiny b4, channels_last", "DDPM step unet-tiny b4, bf16 autocast",
          "two cores, training 2 processes x 1 thread (accelerate launch) vs 1 process x 1 thread",
          "training data loader, 2 workers vs none (1 process x 1 thread)",
          "DIP bf16 PSNR vs fp32, 2 real test images"]


@pytest.mark.slow
def test_levers_one_at_a_time_against_the_plain_path(tmp_path, one_thread):
    """--levers: a row per lever, the plain path as baseline, the two-core rows from real
    jobs.train runs (one of them two processes under accelerate launch) on real shards."""
    if importlib.util.find_spec("diffusers") is None:
        skip_or_fail('diffusers is not installed: pip install -c constraints.txt -e ".[bench]"')
    from bench.run import main

    data = make_shards(tmp_path, 32, 8, 8)
    rows = main(["--preset", "tiny", "--device", "cpu", "--only", "a", "--levers",
                 "--data", str(data), "--out", str(tmp_path / "rows.json")])
    names = [r.name for r in rows]
    for name in LEVERS:
        assert f"lever: {name}" in names, name
    for r in rows:
        if r.name.startswith("lever: DIP bf16 PSNR"):
            assert 0 <= r.ours < 1 and r.unit == "dB"  # 4 iterations: far below 0.2 dB
        elif r.name.startswith("lever: "):
            assert r.ours > 0 and r.baseline > 0, r
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(rows)


def test_lever_groups_run_alone_and_a_bad_group_is_one_line(tmp_path, one_thread):
    """--levers GROUPS: only those groups' rows (the quiet run can time compile on its own)."""
    from bench.run import main
    from dipddpm.config import UserError

    data = make_shards(tmp_path, 32, 8, 8)
    rows = main(["--preset", "tiny", "--device", "cpu", "--only", "", "--levers", "sampling",
                 "--data", str(data)])
    levers = [r.name for r in rows if r.name.startswith("lever: ")]
    assert levers and all(n.startswith("lever: DDPM step") for n in levers), levers
    with pytest.raises(UserError, match="--levers sampling,speed: groups are"):
        main(["--preset", "tiny", "--only", "", "--levers", "sampling,speed", "--data", str(data)])
    with pytest.raises(UserError, match="--only ''"):
        main(["--preset", "tiny", "--only", "", "--data", str(data)])
    with pytest.raises(UserError, match="--levers compile: the tiny preset times no"):
        main(["--preset", "tiny", "--only", "", "--levers", "compile", "--data", str(data)])


def test_diffusers_pairs_match_in_size():
    if importlib.util.find_spec("diffusers") is None:
        skip_or_fail('diffusers is not installed: pip install -c constraints.txt -e ".[bench]"')
    import torch

    from bench.diffusers_ref import PAIRS, build_diffusers_unet
    from dipddpm.models.unet import build_unet, count_parameters

    for name in PAIRS:
        ours = count_parameters(build_unet(name))
        theirs = count_parameters(build_diffusers_unet(name))
        assert abs(ours - theirs) / ours < 0.08, (name, ours, theirs)
    out = build_diffusers_unet("unet-tiny")(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.sample.shape == (2, 1, 28, 28)  # 28x28 needs no padding


def test_library_does_not_import_diffusers():
    import re
    from pathlib import Path

    from tests.conftest import REPO

    imports = re.compile(r"^\s*(import|from)\s+diffusers\b", re.M)
    files = list((Path(REPO) / "dipddpm").rglob("*.py"))
    assert len(files) > 10
    assert [str(p) for p in files if imports.search(p.read_text())] == []
