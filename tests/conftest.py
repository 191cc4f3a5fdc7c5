"""Shared fixtures: small generated IDX files, and real FashionMNIST shards when available.

Real-data tests need DIPDDPM_DATA (a folder with the four IDX files); `.ci/run` sets it, so CI
always runs them. On a developer machine without it they skip; under CI=true they fail.
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["tests.conftest_slurm"]  # the real local SLURM cluster fixture

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def make_idx_folder(folder: Path, n_train: int = 40, n_test: int = 20, seed: int = 0,
                    compress: bool = True) -> Path:
    """Four IDX files of random images with labels 0..9 cycling."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x803, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte",
                  (np.arange(n) % 10).astype(np.uint8), 0x801, compress)
    return folder


def make_shards(root: Path, n_train: int, n_test: int, shard_size: int) -> Path:
    """Generated IDX files under root/idx, prepared into shards under root/shards."""
    from dipddpm.config import load_config
    from dipddpm.data.prepare import prepare_data

    src = make_idx_folder(root / "idx", n_train=n_train, n_test=n_test)
    out = root / "shards"
    prepare_data(load_config(None, [f"data.source={src}", f"data.dir={out}",
                                    f"data.shard_size={shard_size}"]), progress=False)
    return out


def make_tiny_world(root: Path, n_test: int, T: int) -> dict:
    """Shards of 16 random train / n_test test images (root/shards) and a 'trained' tiny DDPM
    run dir (root/ddpm): unet-tiny with random weights, T steps, as the protocols load one."""
    import torch

    from dipddpm.config import dump_config, load_config
    from dipddpm.models.unet import build_unet

    data = make_shards(root, n_train=16, n_test=n_test, shard_size=8)
    ddpm = root / "ddpm"
    ddpm.mkdir()
    trained = load_config(None, ["model.name=unet-tiny", f"diffusion.T={T}"])
    (ddpm / "config.yaml").write_text(dump_config(trained))
    torch.manual_seed(0)
    net = build_unet("unet-tiny")
    with torch.no_grad():  # the registry zero-inits the head: make it a non-trivial predictor
        net.head[-1].weight.normal_(0, 0.02)
    torch.save({"ema": {"model": net.state_dict()}}, ddpm / "ema.pt")
    return {"root": root, "data": data, "ddpm": ddpm}


def skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one torch thread is much faster than two on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    return make_idx_folder(tmp_path / "idx")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = os.environ.get("DIPDDPM_DATA")
    if not path or not Path(path).is_dir():
        skip_or_fail("DIPDDPM_DATA does not name the real FashionMNIST IDX folder")
    return Path(path)


@pytest.fixture(scope="session")
def real_shards(real_data_dir, tmp_path_factory) -> Path:
    """Shards of the real FashionMNIST, built once per test session."""
    from dipddpm.config import load_config
    from dipddpm.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("real") / "fashion-mnist"
    cfg = load_config(None, [f"data.source={real_data_dir}", f"data.dir={out}"])
    prepare_data(cfg, progress=False)
    return out
