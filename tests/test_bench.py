"""bench.run at tiny sizes: every row present with positive rates; --append adds a dated section.

diffusers is the `bench` extra: without it these tests skip, and under CI=true they fail."""
import importlib.util
import json

import pytest

from tests.conftest import make_shards, skip_or_fail

EXPECTED = [
    "(a) DDPM training, unet-tiny vs UNet2DModel",
    "(b) DIP fitting, 2 nets at once vs one at a time",
    "(c) DDPM sampling step, unet-tiny vs UNet2DModel",
    "(c) DDPM sampling T=1000, unet-tiny vs UNet2DModel",
    "(c) DDIM sampling 2 steps, unet-tiny vs UNet2DModel",
    "(d) prior precompute job end to end vs one net at a time",
]


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


def test_rows_have_positive_rates(bench_result):
    rows, tmp = bench_result
    assert [r.what for r in rows] == EXPECTED
    for r in rows:
        assert r.ours > 0 and r.baseline > 0 and r.ratio > 0, r
    step, full = rows[2], rows[3]
    # images/s of the T=1000 chain follows from ms/step: batch 4 / (ms * 1000 / 1000)
    assert full.ours == pytest.approx(4 / step.ours)
    assert step.ratio == pytest.approx(step.baseline / step.ours)
    saved = json.loads((tmp / "rows.json").read_text())
    assert [r["what"] for r in saved["rows"]] == EXPECTED
    assert saved["preset"] == "tiny" and saved["commit"]


def test_append_adds_a_dated_section(bench_result):
    _, tmp = bench_result
    text = (tmp / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n\n### ")
    meta = [line for line in text.splitlines() if line.startswith("device: ")]
    assert len(meta) == 1
    assert "date: 20" in meta[0] and " UTC; commit: " in meta[0] and "CPU" in meta[0]
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table) == len(EXPECTED)


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
