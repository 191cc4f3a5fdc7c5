"""The DDPM training loop: one Accelerate `while` loop, schedules counted in images seen.

    python -m jobs.train --config configs/ddpm.yaml run.dir=runs/ddpm
    accelerate launch -m jobs.train --config configs/ddpm.yaml run.dir=runs/ddpm   # N processes

Exact resume. A run stopped at a checkpoint and resumed replays the uninterrupted run's loss
sequence bit for bit (on CPU; tested). What makes that hold:
  - the t/eps generator (and the global RNG, for dropout) is reseeded every optimizer step from
    (run.seed, step, rank), so no generator state needs saving;
  - the data order is a pure function of (seed, epoch, world size, workers); a checkpoint stores
    the epoch and how many of its batches were consumed, and the resumed loader skips them;
  - the partial loss average of the current log interval is in the checkpoint too;
  - model, optimizer (and GradScaler) state come back through accelerator.load_state.
A kill between checkpoints loses the steps since the last one; they are redone identically,
and metrics.jsonl is cut back to the rows the checkpoint had seen (`TrainState.metrics_rows`,
the Tracker's resume mechanism, see dipddpm/tracking.py), so every step and every epoch line
appears exactly once; W&B then gets the rows it missed.

train.noise=dip is the study's own variant (dip_noise.py): the same loop, the same t draws, but a
DIP output stands in for the Gaussian noise. At the end the main process writes
run.dir/results.json (schema in `write_results`), which the report reads for the study's tables.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from dipddpm.artifacts import save_grid
from dipddpm.config import Config, UserError
from dipddpm.data import batches_per_epoch, make_loader
from dipddpm.diffusion import Diffusion, ddim_sample
from dipddpm.models.unet import build_unet, count_parameters
from dipddpm.progress import bar
from dipddpm.precision import accelerate_precision
from dipddpm.runs import METRICS_FILE, RESULTS_FILE, SAMPLES_DIR, atomic_write_json, \
    prepare_run_dir, read_jsonl, seed_everything
from dipddpm.tracking import Tracker, rows_through_step
from dipddpm.train.checkpoint import WEIGHTS_FILE, TrainState, latest_checkpoint, \
    load_checkpoint, save_checkpoint, save_weights, snapshot_path
from dipddpm.train.dip_noise import DipNoise
from dipddpm.train.ema import EMA


def make_accelerator(mixed_precision: str | None, cpu: bool | None = None,
                     compile: bool = False) -> Accelerator:
    """An Accelerator that fails loudly when it sees fewer processes than were launched.

    mixed_precision None takes the launcher's (`accelerate launch --mixed_precision`, or its
    `accelerate config` file, both passed as ACCELERATE_MIXED_PRECISION), else "no"; a value
    holds over the launcher's, with one warning line where the two differ.
    cpu defaults to True on a CPU-only host: a plain Accelerator() under torchrun there reports
    one process per rank and every rank would train alone, silently."""
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    # "auto" becomes bf16 where the hardware has native bf16, else "no" (dipddpm.precision)
    if mixed_precision is not None:
        mixed_precision = accelerate_precision(mixed_precision, "cpu" if cpu else "cuda")
    # compile through Accelerate: it compiles after the DDP wrap, and unwraps for save_state
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                      dynamo_backend="inductor" if compile else None)
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != acc.num_processes:
        raise UserError(f"launched with WORLD_SIZE={launched} but Accelerate sees "
                        f"{acc.num_processes} process(es): the ranks would train separately; "
                        "on a CPU host use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if mixed_precision is not None and launcher and launcher != mixed_precision \
            and acc.is_main_process:
        print(f"warning: train.mixed_precision = {mixed_precision} (config) holds over the "
              f"launcher's {launcher} (ACCELERATE_MIXED_PRECISION)", flush=True)
    return acc


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW with train.optimizer_impl: torch's default, foreach or fused (the same update)."""
    return set_optimizer_impl(torch.optim.AdamW(model.parameters(), lr=t.lr,
                                                weight_decay=t.weight_decay), t.optimizer_impl)


def set_optimizer_impl(optimizer, impl: str):
    """Set the implementation flags, also after a resume: load_state_dict brings back the flags
    the checkpoint was saved with, so a run resumed with another train.optimizer_impl would
    otherwise keep the old one."""
    for group in optimizer.param_groups:
        group["foreach"] = True if impl == "foreach" else None
        group["fused"] = True if impl == "fused" else None
    if impl == "fused":  # the fused kernel wants step counts beside the parameters
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p)
                if st and torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(p.device, torch.float32)
    return optimizer


def lr_at(images: int, cfg, total_images: float) -> float:
    """Linear warmup then constant or cosine (to 0 at total_images), all in images seen."""
    t = cfg.train
    lr = t.lr * min(1.0, images / t.warmup_images) if t.warmup_images > 0 else t.lr
    if t.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, images / max(total_images, 1))))
    return lr


def ema_decay_at(step: int, images: int, t) -> float:
    """0 (copy) before ema_start_images; then, with ema_warmup, min(decay, (1+n)/(10+n)) as in
    diffusers/timm, so a short run's average is not stuck near the random init (at decay
    0.999 the init still weighs 0.999^150 = 86% after 150 steps)."""
    if images < t.ema_start_images:
        return 0.0
    return min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay


def step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8],
                          "little") >> 1


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def training_noise(x0: torch.Tensor, gen: torch.Generator, dip_noise, seed: int) -> torch.Tensor:
    """The noise of the objective: N(0, I) from the step's generator, or in the study's variant
    the DIP output (its own fp32 graph: call it outside the U-Net's autocast and no_sync)."""
    if dip_noise is not None:
        return dip_noise(x0, seed)
    return torch.randn(x0.shape, device=x0.device, generator=gen)


def write_results(run_dir, cfg: Config, state: TrainState, *, params: int, epochs: float,
                  final_loss, world: int, mixed_precision: str) -> dict:
    """run.dir/results.json of a training run: one row of the study's training-time and
    loss-vs-T tables. Keys (the report depends on them):
      job "train"; variant "ddpm" | "dip_in_training"; model; params (U-Net); T; epochs (data
      epochs read, fractional); steps; images_seen (all ranks); train_seconds (wall time of the
      training loop, summed over resumed segments); final_loss (mean loss of the last log
      interval); dip_iters (null for the Gaussian path); world_size; device; mixed_precision
      (the one that held: the config's, else the launcher's)."""
    dip = cfg.train.noise == "dip"
    results = {"job": "train", "variant": "dip_in_training" if dip else "ddpm",
               "model": cfg.model.name, "params": int(params), "T": int(cfg.diffusion.T),
               "epochs": float(epochs), "steps": int(state.step),
               "images_seen": int(state.images_seen), "train_seconds": float(state.train_seconds),
               "final_loss": None if final_loss is None else float(final_loss),
               "dip_iters": int(cfg.train.dip_iters) if dip else None, "world_size": int(world),
               "device": device_name(), "mixed_precision": mixed_precision}
    atomic_write_json(Path(run_dir) / RESULTS_FILE, results)
    return results


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _last_logged_loss(run_dir):
    # a rerun of a finished run logs nothing new: its last interval's loss is in the file
    rows = [r for r in read_jsonl(Path(run_dir) / METRICS_FILE) if "loss" in r]
    return rows[-1]["loss"] if rows else None


def reads(cfg: Config) -> tuple[str, ...]:
    """The config keys a training run's results depend on (the run dir's resume check): the
    data order's (dir, workers, shuffle buffer), the model's, the diffusion's, the training's,
    and in the study's variant the DIP's. Neutral keys among them may change on resume."""
    keys = ("run", "data.dir", "data.num_workers", "data.shuffle_buffer", "model", "diffusion",
            "train")
    return keys + (("dip",) if cfg.train.noise == "dip" else ())


def metrics_rows_at(run_dir, state: TrainState, going_on: bool) -> int:
    """How many metrics.jsonl rows a resume from the checkpoint of `state` keeps.

    The checkpoint records the count; one saved before it did holds the rows up to its step
    but not that step's epoch lines, which the loop logs while the next step runs (after the
    checkpoint) and logs again when it redoes that step. If the run goes on past a stop that
    fell mid log interval, the stop's partial line goes too: the full line replaces it."""
    path = Path(run_dir) / METRICS_FILE
    n = state.metrics_rows
    if n is None:
        n = rows_through_step(path, state.step, after=lambda row: "epoch_time_s" in row)
    kept = read_jsonl(path)[:n]
    if going_on and kept and kept[-1].get("partial") and kept[-1].get("step") == state.step:
        n = len(kept) - 1
    return n


def train(cfg: Config) -> dict:
    acc = make_accelerator(cfg.train.mixed_precision, compile=cfg.train.compile)
    t = cfg.train
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    run_dir = prepare_run_dir(cfg, acc.is_main_process, reads=reads(cfg))
    acc.wait_for_everyone()

    # The same initial weights on every rank (DDP would broadcast rank 0's anyway, but the EMA
    # copy is taken before that), then a different stream per rank for everything else.
    seed_everything(cfg.run.seed)
    model = build_unet(cfg.model.name)
    if t.channels_last:  # NHWC weights make every conv of the model NHWC (oneDNN's fast layout)
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, t.ema_decay)
    seed_everything(cfg.run.seed * world + rank)
    diffusion = Diffusion.from_config(cfg.diffusion)
    optimizer = make_optimizer(model, t)
    model, optimizer = acc.prepare(model, optimizer)  # not the loader: see dipddpm/data/stream.py
    ema.model.to(device)

    loader_args = dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                       seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    bpe = batches_per_epoch(cfg.data.dir, "train", t.batch_size, **loader_args)
    if bpe < 1:
        raise UserError(f"{cfg.data.dir}: the train split gives no batch of {t.batch_size} "
                        f"per rank with {world} process(es)")
    images_per_step = t.batch_size * t.grad_accum * world
    total_images = t.epochs * bpe * t.batch_size * world
    total_steps = t.max_steps if t.max_steps is not None else int(t.epochs * bpe) // t.grad_accum

    state = TrainState()
    resumed_from = latest_checkpoint(run_dir) if cfg.run.resume else None
    keep_rows = 0 if cfg.run.resume else None  # no checkpoint yet: every step gets redone
    if resumed_from is not None:
        state = load_checkpoint(acc, resumed_from, ema)
        set_optimizer_impl(optimizer, t.optimizer_impl)
        if acc.is_main_process:
            keep_rows = metrics_rows_at(run_dir, state, going_on=state.step < total_steps)
    acc.wait_for_everyone()

    # the rows of steps that will be redone are cut (and W&B gets the rows it missed)
    tracker = Tracker(run_dir, cfg, "train", enabled=acc.is_main_process, keep_rows=keep_rows,
                      x_axis="images_seen")  # W&B charts training against images seen
    debug = run_dir / "debug"
    keys_file = None
    if t.rank_debug:
        debug.mkdir(parents=True, exist_ok=True)
        keys_file = open(debug / f"keys-rank{rank}.txt", "a")
    if acc.is_main_process:
        print(f"dipddpm train: {cfg.model.name} ({count_parameters(ema.model):,} params), "
              f"{world} process(es) on {device}, {bpe} batches/epoch/rank, {total_steps} steps "
              f"of {images_per_step} images" +
              (f", resumed from {resumed_from.name}" if resumed_from else ""), flush=True)

    def epoch_batches(epoch: int, skip: int):
        # An epoch's length can differ from epoch 0's when shards are unequal (the loader
        # stops every rank at the shortest rank's count), so each epoch reports its own.
        loader = make_loader(cfg.data.dir, "train", t.batch_size, epoch=epoch,
                             skip_batches=skip, **loader_args)
        return iter(loader), len(loader)

    batches, epoch_len = epoch_batches(state.epoch, state.batch_in_epoch)
    noise_gen = torch.Generator(device=device)
    loss_sum = torch.tensor(state.loss_sum, device=device)
    sample_gen_seed = cfg.run.seed  # the same noise for every grid: frames of one film
    dip_noise = DipNoise(cfg.dip, t.dip_iters) if t.noise == "dip" else None
    final_loss = None

    def sample_grid():
        n = t.sample_num_images
        if n == 0 or not acc.is_main_process:
            return
        with acc.autocast():
            x, _ = ddim_sample(ema.model, diffusion, (n, 1, 28, 28), steps=t.sample_steps,
                               generator=torch.Generator(device).manual_seed(sample_gen_seed),
                               device=device)
        path = run_dir / SAMPLES_DIR / f"img-{state.images_seen:012d}.png"
        save_grid(x, path)
        tracker.log_image("samples", path, state.step)

    pbar = bar(total_steps, "train", initial=state.step, disable=not acc.is_main_process)
    t_epoch = time.perf_counter()
    train_time, images_at_log = 0.0, state.images_seen  # img/s counts training only
    # train_seconds: the loop's wall time less the sample grids (monitoring, whose cost is set by
    # train.sample_num_images, not by the training); checkpoints and data loading count
    t_loop, seconds_before, grid_seconds = time.perf_counter(), state.train_seconds, 0.0
    while state.step < total_steps:
        t_step = time.perf_counter()
        lr = lr_at(state.images_seen + images_per_step, cfg, total_images)  # first step: lr > 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed = step_seed(cfg.run.seed, state.step, rank)
        noise_gen.manual_seed(seed)
        torch.manual_seed(seed)  # dropout, if a model has it

        # Micro-steps: gradients sync only on the last one; each loss is scaled so their sum
        # is the mean over the grad_accum batches.
        step_loss = 0.0
        for micro in range(t.grad_accum):
            if state.batch_in_epoch == epoch_len:  # next epoch: a fresh, reshuffled order
                tracker.log({"images_seen": state.images_seen, "epoch": state.epoch + 1,
                             "epoch_time_s": time.perf_counter() - t_epoch}, state.step)
                t_epoch = time.perf_counter()
                state.epoch += 1
                state.batch_in_epoch = 0
                batches, epoch_len = epoch_batches(state.epoch, 0)
            batch = next(batches)
            state.batch_in_epoch += 1
            if keys_file is not None:
                keys_file.write(f"{state.step} " + " ".join(batch["key"]) + "\n")
            x0 = batch["image"].to(device, non_blocking=True)
            if t.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            tt = torch.randint(0, diffusion.T, (x0.shape[0],), device=device, generator=noise_gen)
            # each micro-batch of the variant gets its own DIP net (seed + micro)
            noise = training_noise(x0, noise_gen, dip_noise, (seed + micro) % 2**63)
            sync = nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with acc.autocast():
                    loss = diffusion.loss(model, x0, tt, noise)
                acc.backward(loss / t.grad_accum)
            step_loss = step_loss + loss.detach() / t.grad_accum
        if t.clip_grad > 0:
            acc.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(acc.unwrap_model(model), ema_decay_at(state.step, state.images_seen, t))

        before = state.images_seen
        state.step += 1
        state.images_seen += images_per_step
        # One scalar all-reduce per step: cheap beside DDP's, and it makes the running loss
        # identical on every rank, so a checkpoint can hold it.
        loss_sum += acc.reduce(step_loss, reduction="mean")
        state.loss_count += 1
        pbar.update(1)
        last = state.step == total_steps
        boundary = crossed(before, state.images_seen, t.log_every_images)

        if boundary or last:
            mean_loss = (loss_sum / state.loss_count).item()
            final_loss = mean_loss
            train_time += time.perf_counter() - t_step
            row = {"images_seen": state.images_seen,
                   "epoch": state.epoch + state.batch_in_epoch / epoch_len, "loss": mean_loss, "lr": lr,
                   "img_per_s": (state.images_seen - images_at_log) / max(train_time, 1e-9)}
            if not boundary:  # a stop mid-interval: report, but keep accumulating for resume
                row["partial"] = True
            tracker.log(row, state.step)
            pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['img_per_s']:.0f}")
            if boundary:
                loss_sum.zero_()
                state.loss_count = 0
                train_time, images_at_log = 0.0, state.images_seen
        else:
            train_time += time.perf_counter() - t_step
        if crossed(before, state.images_seen, t.sample_every_images) or last:
            t_grid = time.perf_counter()
            sample_grid()
            grid_seconds += time.perf_counter() - t_grid
        if crossed(before, state.images_seen, t.checkpoint_every_images) or last:
            state.loss_sum = loss_sum.item()
            state.metrics_rows = tracker.rows  # what a resume from here keeps (main process)
            state.train_seconds = seconds_before + time.perf_counter() - t_loop - grid_seconds
            save_checkpoint(acc, run_dir, state, ema, t.keep_checkpoints)
        if t.weights_every_images and acc.is_main_process \
                and crossed(before, state.images_seen, t.weights_every_images):
            save_weights(snapshot_path(run_dir, state.images_seen), ema, state,
                         model_name=cfg.model.name)
    pbar.close()
    # state.train_seconds was set at the last step's checkpoint (every run ends on one), so a
    # rerun of a finished run reports the same time as the run itself

    if acc.is_main_process:
        save_weights(run_dir / WEIGHTS_FILE, ema, state, model_name=cfg.model.name)
        if final_loss is None:
            final_loss = _last_logged_loss(run_dir)
        results = write_results(run_dir, cfg, state, params=count_parameters(ema.model),
                                epochs=state.epoch + state.batch_in_epoch / epoch_len,
                                final_loss=final_loss, world=world,
                                mixed_precision=acc.mixed_precision)
        tracker.summary({"train_seconds": results["train_seconds"],
                         "final_loss": results["final_loss"]})
    if keys_file is not None:
        keys_file.close()
        summary = {"rank": rank, "world": world, "step": state.step,
                   "model": state_hash(acc.unwrap_model(model)), "ema": state_hash(ema.model)}
        (debug / f"state-rank{rank}.json").write_text(json.dumps(summary) + "\n")
    tracker.finish()
    acc.wait_for_everyone()
    acc.end_training()
    return {"step": state.step, "images_seen": state.images_seen, "run_dir": str(run_dir)}
