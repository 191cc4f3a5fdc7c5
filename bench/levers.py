"""Every speed lever of BENCHMARKS.md, one at a time, against the plain path (bench.run --levers).

Rows are named "lever: <workload>, <lever>"; ours is the workload with the lever, baseline the
plain path (today's defaults), in the same process and thread count, interleaved. Workloads:
  training   one optimizer step as dipddpm.train.loop takes it (bench.run.our_train_step):
             unet-small at batch 128 (configs/ddpm.yaml) and unet-tiny at batch 32 (the
             quickstart's); levers channels_last, optimizer_impl foreach / fused, bf16 autocast,
             torch.compile (compile seconds and the break-even step count), and the fast path
             of configs/quickstart.yaml (all its speed keys together)
  DIP        16 nets at once (fit_batch, everything our fit does) vs the plain one-net loop
             (bench/dip_reference.py): each formulation (grouped, bmm, loop), bf16, nets at once
             (4, 16, 64), and two cores: 2 torch threads vs two stacks of 8 in two Python
             threads (one stacked net per thread) vs two processes
  sampling   one DDPM step of unet-small and unet-tiny at batch 256: channels_last, bf16
             autocast, the quickstart's sampling keys
  two cores  jobs.train end to end on the real shards (--data): 1 process x 1 thread,
             1 process x 2 threads, 2 processes x 1 thread (accelerate launch), and the data
             loader with 2 workers vs none (decoding off the critical path)
  DIP PSNR   not a speed: bench/dip_precision.py, bf16 vs fp32 on 16 real test images (the max
             |mean PSNR difference| over recorded iterations, in dB; issue 12 asks <= 0.2)
bf16 where this machine has no native bf16 (dipddpm.precision.native_bf16) runs emulated and
~20x slower: those rows time fewer steps and say so. The two-core rows always use the wall
clock (CPU time sums threads).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import dip_throughput
from bench.common import Row, clock_name, side_by_side
from bench.dip_reference import time_reference
from bench.roofline import dip_flops_per_image_iteration, unet_flops
from dipddpm.config import load_config
from dipddpm.diffusion import Diffusion, ddpm_sample
from dipddpm.models.unet import build_unet
from dipddpm.precision import FastForward, native_bf16, resolve
from dipddpm.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TWO_CORES = "cpu, 2 cores (see the row)"


@dataclass(frozen=True)
class LeverSizes:
    train: tuple[tuple[str, int], ...]  # (model, batch)
    train_warmup: int
    train_steps: int
    compile: bool
    dip_batch: int
    dip_batches: tuple[int, ...]
    dip_iters: int
    dip_reps: int
    ref_images: int
    ref_iters: int
    sample: tuple[str, ...]
    sample_batch: int
    sample_steps: int
    sample_reps: int
    e2e_model: str
    e2e_batch: int
    e2e_steps: int
    psnr_images: int = 16  # the DIP bf16 PSNR check: real test images, configs/dip_denoise.yaml
    psnr_overrides: tuple[str, ...] = ()
    compile_only: bool = False  # the training workloads' torch.compile rows alone


LEVER_PRESETS = {
    "full": LeverSizes(train=(("unet-small", 128), ("unet-tiny", 32)), train_warmup=2,
                       train_steps=7, compile=True, dip_batch=16, dip_batches=(4, 16, 64),
                       dip_iters=20, dip_reps=3, ref_images=2, ref_iters=20,
                       sample=("unet-small", "unet-tiny"), sample_batch=256, sample_steps=2,
                       sample_reps=5, e2e_model="unet-small", e2e_batch=32, e2e_steps=40),
    "tiny": LeverSizes(train=(("unet-tiny", 4),), train_warmup=1, train_steps=1, compile=False,
                       dip_batch=2, dip_batches=(2,), dip_iters=2, dip_reps=1, ref_images=1,
                       ref_iters=2, sample=("unet-tiny",), sample_batch=4, sample_steps=1,
                       sample_reps=1, e2e_model="unet-tiny", e2e_batch=4, e2e_steps=4,
                       psnr_images=2, psnr_overrides=("dip.iters=4", "dip.record_every=2")),
}
LEVER_PRESETS["quick"] = LEVER_PRESETS["full"]


def _emulated(device) -> bool:
    return not native_bf16(torch.device(device).type)


def _training(lz: LeverSizes, device, where, peaks) -> list[Row]:
    from bench.run import fast_config, our_train_step, speed_overrides

    fast = speed_overrides("train.")
    variants = {"channels_last": ["train.channels_last=true"],
                "optimizer_impl=foreach": ["train.optimizer_impl=foreach"],
                "optimizer_impl=fused": ["train.optimizer_impl=fused"],
                "fast path (" + " ".join(fast) + ")": fast}
    rows = []
    for name, batch in lz.train:
        flops = unet_flops(name, "ours", True)

        def step(overrides):
            torch.manual_seed(0)
            cfg = load_config(REPO / "configs" / "ddpm.yaml", list(overrides))
            return our_train_step(build_unet(name).to(device), batch, device, cfg), cfg
        if lz.compile_only:
            rows.append(_compile_row(name, batch, device, where, peaks, step, flops, lz))
            continue
        plain, _ = step([])
        fns = {"plain": plain} | {k: step(v)[0] for k, v in variants.items()}
        s = side_by_side(fns, warmup=lz.train_warmup, reps=lz.train_steps, device=device)
        base = f"{name} batch {batch}, {clock_name()} clock, median of {lz.train_steps} " \
               f"interleaved steps after {lz.train_warmup} warm-up"
        for k, v in variants.items():
            cfg = fast_config("train.") if k.startswith("fast") else \
                load_config(REPO / "configs" / "ddpm.yaml", v)
            p = resolve(cfg.train.mixed_precision, device)
            rows.append(_row(f"training {name} b{batch}, {k}", "images/s", batch / s[k],
                             batch / s["plain"], where, base, flops, peaks.get(("conv", p))))
        # bf16 autocast alone: its own pair, fewer steps where it runs emulated
        emu = _emulated(device)  # emulated bf16 is ~20x slower: one untimed-free step
        warm, reps = (0, 1) if emu else (lz.train_warmup, lz.train_steps)
        s2 = side_by_side({"plain": step([])[0],
                           "bf16": step(["train.mixed_precision=bf16"])[0]},
                          warmup=warm, reps=reps, device=device)
        note = f"{name} batch {batch}, {clock_name()} clock, median of {reps} after {warm} warm-up"
        if emu:
            note += "; no native bf16 on this device: emulated (train.mixed_precision=auto " \
                    "keeps fp32 here)"
        rows.append(_row(f"training {name} b{batch}, bf16 autocast", "images/s",
                         batch / s2["bf16"], batch / s2["plain"], where, note, flops,
                         peaks.get(("conv", "bf16"))))
        if lz.compile:
            rows.append(_compile_row(name, batch, device, where, peaks, step, flops, lz))
    return rows


def _compile_row(name, batch, device, where, peaks, step, flops, lz) -> Row:
    """Cold compile: dynamo reset and torch's fresh_inductor_cache (empty on-disk inductor and
    Triton caches, in-memory caches cleared), so the first step pays the whole compilation."""
    eager, _ = step([])
    compiled, _ = step(["train.compile=true"])
    from torch._inductor.utils import fresh_inductor_cache  # only here: slow to import

    torch._dynamo.reset()  # no compiled code of an earlier row kept in memory
    with fresh_inductor_cache():
        start = time.perf_counter()
        compiled()  # traces and compiles (inductor): minutes on a CPU
        first = time.perf_counter() - start
    s = side_by_side({"plain": eager, "compiled": compiled}, warmup=lz.train_warmup,
                     reps=lz.train_steps, device=device)
    compile_s = first - s["compiled"]
    gain = s["plain"] - s["compiled"]
    even = f"break-even after {compile_s / gain:,.0f} steps" if gain > 0 else \
        "never breaks even (not faster per step)"
    return _row(f"training {name} b{batch}, torch.compile", "images/s", batch / s["compiled"],
                batch / s["plain"], where,
                f"cold compile (first step minus a compiled step, wall, empty inductor cache) "
                f"{compile_s:.0f} s; {even}; "
                f"{clock_name()} clock per step", flops, peaks.get(("conv", "fp32")))


def _row(name, unit, ours, base, where, settings, flops_per_unit, peak) -> Row:
    return Row(f"lever: {name}", unit, ours, base, where, settings,
               gflops=ours * flops_per_unit / 1e9, peak_gflops=peak)


def _dip(lz: LeverSizes, device, where, peaks) -> list[Row]:
    flops = dip_flops_per_image_iteration()
    dtype = torch.float32
    arms = {f: (lambda f=f: dip_throughput.time_batch(lz.dip_batch, lz.dip_iters, device,
                                                      dtype, f)) for f in
            ("grouped", "bmm", "loop")}
    arms["fit_single (ours, one at a time)"] = lambda: dip_throughput.time_single(
        lz.ref_images, lz.ref_iters, device, dtype)
    for b in lz.dip_batches:
        if b != lz.dip_batch:
            arms[f"grouped, {b} nets"] = (lambda b=b: dip_throughput.time_batch(
                b, lz.dip_iters, device, dtype))
    rates = {k: [] for k in ["reference", *arms]}
    for _ in range(lz.dip_reps):
        rates["reference"].append(time_reference(lz.ref_images, lz.ref_iters, device))
        for k, fn in arms.items():
            rates[k].append(fn())
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = (f"{lz.dip_batch} nets at once unless stated, {lz.dip_iters} its; baseline "
            f"bench/dip_reference.py ({lz.ref_images} x {lz.ref_iters} its); {clock_name()} "
            f"clock, median of {lz.dip_reps} interleaved rounds")
    rows = [_row(f"DIP, {k} fp32 vs plain one-net loop", "image-iterations/s", med[k],
                 med["reference"], where, base, flops, peaks.get(("conv", "fp32")))
            for k in arms]
    emu = _emulated(device)
    iters = 3 if emu else lz.dip_iters
    ref = dip_throughput.time_batch(lz.dip_batch, iters, device, dtype)
    bf = dip_throughput.time_batch(lz.dip_batch, iters, device, dtype, "grouped", "bf16")
    rows.append(_row("DIP, grouped bf16 vs grouped fp32", "image-iterations/s", bf, ref, where,
                     f"{lz.dip_batch} nets, {iters} its, one round, {clock_name()} clock" +
                     ("; no native bf16 here: emulated (dip.precision=auto keeps fp32)"
                      if emu else ""), flops, peaks.get(("conv", "bf16"))))
    rows += _dip_two_cores(lz, device, where, peaks, flops)
    return rows


def _stack_rate(b: int, iters: int, device) -> float:
    return dip_throughput.time_batch(b, iters, device, torch.float32)


def _dip_two_cores(lz, device, where, peaks, flops) -> list[Row]:
    """Wall clock: 1 thread, 2 torch threads, two half stacks in two Python threads (each op
    on its calling thread, the GIL released inside kernels), two processes."""
    if torch.device(device).type != "cpu":
        return []
    b, iters = lz.dip_batch, lz.dip_iters
    old = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(1)
        t = time.perf_counter()
        _stack_rate(b, iters, device)
        results["1 thread"] = b * iters / (time.perf_counter() - t)
        torch.set_num_threads(2)
        _stack_rate(b, 2, device)  # warm the 2-thread primitives
        t = time.perf_counter()
        _stack_rate(b, iters, device)
        results["2 torch threads, one stack"] = b * iters / (time.perf_counter() - t)
        torch.set_num_threads(1)
        half = max(1, b // 2)
        _stack_rate(half, 2, device)
        workers = [threading.Thread(target=_stack_rate, args=(half, iters, device))
                   for _ in range(2)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results["two stacks in two threads"] = 2 * half * iters / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    results["two stacks in two processes"] = _two_processes(half, iters)
    one = results.pop("1 thread")
    return [_row(f"DIP two cores, {k} vs 1 thread", "image-iterations/s", v, one, TWO_CORES,
                 f"{b} nets in all, {iters} its, wall clock, one run each", flops,
                 peaks.get(("conv", "fp32"))) for k, v in results.items()]


def _child_env(threads: int) -> dict:
    """The environment of a child Python: this repository importable, `threads` OpenMP threads."""
    return os.environ | {"OMP_NUM_THREADS": str(threads),
                         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")]))}


def _two_processes(half: int, iters: int) -> float:
    code = ("import json, time, torch; torch.set_num_threads(1); "
            "from bench.dip_throughput import time_batch; "
            f"time_batch({half}, 2, 'cpu', torch.float32); "
            "t = time.perf_counter(); "
            f"time_batch({half}, {iters}, 'cpu', torch.float32); "
            "print(json.dumps([t, time.perf_counter()]))")
    env = _child_env(1)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for _ in range(2)]
    spans = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    # both processes share one clock (perf_counter is system-wide monotonic on Linux)
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return 2 * half * iters / wall


def _sampling(lz: LeverSizes, device, where, peaks) -> list[Row]:
    from bench.run import speed_overrides

    cfg = load_config(REPO / "configs" / "ddpm.yaml", speed_overrides("sample."))
    diffusion = Diffusion.from_config(cfg.diffusion)
    n = lz.sample_batch
    zeros = torch.zeros(n, 1, 28, 28, device=device)
    rows = []
    emu = _emulated(device)
    for name in lz.sample:
        flops = unet_flops(name, "ours", False)

        def model(precision="fp32", cl=False):
            torch.manual_seed(0)
            return FastForward(build_unet(name).to(device).eval(), precision, cl)

        def ddpm(m, steps=lz.sample_steps):
            return lambda: ddpm_sample(m, diffusion, x0_hat=zeros, t0=steps, generator=0,
                                       device=device)
        fns = {"plain": ddpm(model()), "channels_last": ddpm(model(cl=True)),
               "fast": ddpm(model(cfg.sample.precision, cfg.sample.channels_last))}
        s = side_by_side(fns, warmup=1, reps=lz.sample_reps, device=device)
        base = f"{name}, batch {n}, {clock_name()} clock, median of {lz.sample_reps} " \
               f"interleaved runs of {lz.sample_steps} DDPM steps"
        fast_name = "fast path (sample.precision=" + cfg.sample.precision + \
            f", sample.channels_last={cfg.sample.channels_last})"
        for k, label in (("channels_last", "channels_last"), ("fast", fast_name)):
            p = resolve(cfg.sample.precision, device) if k == "fast" else "fp32"
            rows.append(_row(f"DDPM step {name} b{n}, {label}", "images/s",
                             n * lz.sample_steps / s[k], n * lz.sample_steps / s["plain"],
                             where, base, flops, peaks.get(("conv", p))))
        # emulated bf16 is ~20x slower: one step, once
        warm, reps, steps = (0, 1, 1) if emu else (1, lz.sample_reps, lz.sample_steps)
        s2 = side_by_side({"plain": ddpm(model(), steps), "bf16": ddpm(model("bf16"), steps)},
                          warmup=warm, reps=reps, device=device)
        rows.append(_row(f"DDPM step {name} b{n}, bf16 autocast", "images/s",
                         n * steps / s2["bf16"], n * steps / s2["plain"], where,
                         f"{name}, batch {n}, median of {reps} runs of {steps} steps, "
                         f"{clock_name()} clock" +
                         ("; no native bf16 here: emulated (sample.precision=auto keeps fp32)"
                          if emu else ""), flops, peaks.get(("conv", "bf16"))))
    return rows


def _train_job(data_dir: Path, tmp: Path, tag: str, lz: LeverSizes, *, processes: int,
               threads: int, workers: int) -> float:
    """img/s of jobs.train end to end (median over log intervals after the first)."""
    from bench.run import speed_overrides

    run_dir = tmp / tag
    per_log = lz.e2e_batch * processes * 4
    args = ["--config", str(REPO / "configs" / "ddpm.yaml"), f"data.dir={data_dir}",
            f"run.dir={run_dir}", "wandb.mode=disabled", f"model.name={lz.e2e_model}",
            f"train.batch_size={lz.e2e_batch}", f"train.max_steps={lz.e2e_steps}",
            f"data.num_workers={workers}", f"train.log_every_images={per_log}",
            "train.sample_num_images=0", "train.checkpoint_every_images=100000000",
            "train.sample_every_images=100000000", *speed_overrides("train.")]
    env = _child_env(threads)
    if processes == 1:
        cmd = [sys.executable, "-m", "jobs.train", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jobs.train", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{tag}: jobs.train failed:\n{r.stderr[-2000:]}")
    rates = [row["img_per_s"] for row in read_jsonl(run_dir / "metrics.jsonl")
             if "img_per_s" in row and not row.get("partial")]
    return statistics.median(rates[1:] or rates)


def _two_cores_training(lz: LeverSizes, data_dir: Path, where, peaks) -> list[Row]:
    flops = unet_flops(lz.e2e_model, "ours", True)
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        tmp = Path(tmp)
        one = _train_job(data_dir, tmp, "p1t1", lz, processes=1, threads=1, workers=0)
        runs = {"1 process x 2 threads": _train_job(data_dir, tmp, "p1t2", lz, processes=1,
                                                    threads=2, workers=0),
                "2 processes x 1 thread (accelerate launch)":
                    _train_job(data_dir, tmp, "p2t1", lz, processes=2, threads=1, workers=0)}
        workers = _train_job(data_dir, tmp, "p1t1w2", lz, processes=1, threads=1, workers=2)
    base = (f"jobs.train end to end on the real shards, {lz.e2e_model}, batch "
            f"{lz.e2e_batch} per process, {lz.e2e_steps} steps, the quickstart's speed keys, "
            f"img_per_s of metrics.jsonl (median over log intervals after the first), wall clock")
    rows = [_row(f"two cores, training {k} vs 1 process x 1 thread", "images/s", v, one,
                 TWO_CORES, base, flops, None) for k, v in runs.items()]
    rows.append(_row("training data loader, 2 workers vs none (1 process x 1 thread)",
                     "images/s", workers, one, "cpu, 1 thread + 2 loader processes", base,
                     flops, None))
    return rows


def _dip_psnr(lz: LeverSizes, data_dir: Path, device, where) -> Row:
    """bench/dip_precision.py: bf16 vs fp32 DIP on the first psnr_images real test images."""
    from bench.dip_precision import compare

    start = time.perf_counter()
    r = compare(data_dir, lz.psnr_images, 25.0, lz.psnr_overrides, device)
    diffs = ", ".join(f"{x['iter']}: {x['diff']:+.3f} ({x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f})"
                      for x in r["rows"])
    return Row(f"lever: DIP bf16 PSNR vs fp32, {r['images']} real test images", "dB",
               r["max_abs_diff"], None, where,
               f"max over recorded iterations of |mean PSNR bf16 - fp32| of the estimate, "
               f"sigma 25, {r['iters']} its, bf16 {r['bf16']}; "
               f"{'keeps' if r['keeps_psnr'] else 'does NOT keep'} PSNR within 0.2 dB; per "
               f"iteration, paired mean difference (bootstrap 95% CI): {diffs}; "
               f"{time.perf_counter() - start:.0f} s")


LEVER_GROUPS = ("training", "compile", "dip", "sampling", "two-cores", "psnr")


def run_levers(lz: LeverSizes, device, where: str, peaks: dict, data_dir: Path,
               groups: tuple[str, ...] = LEVER_GROUPS) -> list[Row]:
    """The lever rows of `groups` (LEVER_GROUPS: all): compile (minutes of inductor on one
    thread) and psnr (not a speed; ~1 h where bf16 is emulated) can run on their own."""
    if lz.compile and "compile" in groups and "training" not in groups:
        lz = dataclasses.replace(lz, compile_only=True)
    elif "compile" not in groups:
        lz = dataclasses.replace(lz, compile=False)
    rows = []
    if "training" in groups or lz.compile_only:
        rows += _training(lz, device, where, peaks)
    if "dip" in groups:
        rows += _dip(lz, device, where, peaks)
    if "sampling" in groups:
        rows += _sampling(lz, device, where, peaks)
    if "two-cores" in groups and torch.device(device).type == "cpu":
        rows += _two_cores_training(lz, Path(data_dir).resolve(), where, peaks)
    if "psnr" in groups:
        rows.append(_dip_psnr(lz, Path(data_dir).resolve(), device, where))
    return rows
