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
from contextlib import contextmanager, nullcontext
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


class EpochData:
    """This rank's batches, epoch after epoch. Each epoch is a fresh, reshuffled order; its
    length can differ from epoch 0's when shards are unequal (the loader stops every rank at
    the shortest rank's count), so each epoch reports its own. The loader is not passed through
    accelerator.prepare (see dipddpm/data/stream.py)."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.dir, self.batch_size = cfg.data.dir, cfg.train.batch_size
        self.loader_args = dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer)
        self.per_epoch = batches_per_epoch(self.dir, "train", self.batch_size, **self.loader_args)
        if self.per_epoch < 1:
            raise UserError(f"{self.dir}: the train split gives no batch of {self.batch_size} "
                            f"per rank with {world} process(es)")
        self.batches, self.epoch_len = iter(()), 0

    def start(self, epoch: int, skip: int) -> None:
        """Read `epoch` from its batch `skip` on (a resume skips what the checkpoint consumed)."""
        loader = make_loader(self.dir, "train", self.batch_size, epoch=epoch,
                             skip_batches=skip, **self.loader_args)
        self.batches, self.epoch_len = iter(loader), len(loader)

    def epochs_read(self, state: TrainState) -> float:
        return state.epoch + state.batch_in_epoch / self.epoch_len


class Clocks:
    """The loop's timing. img/s in a log line counts the training steps of its interval only;
    train_seconds (results.json, summed over the segments of a resumed run) is the loop's wall
    time less the sample grids (monitoring, whose cost is set by train.sample_num_images, not
    by the training): checkpoints and data loading count; an epoch line carries the epoch's
    wall time."""

    def __init__(self, state: TrainState):
        self.epoch_start = time.perf_counter()
        self.steps_time, self.images_at_log = 0.0, state.images_seen
        self.loop_start, self.seconds_before, self.grid_seconds = \
            time.perf_counter(), state.train_seconds, 0.0
        self.step_start = self.loop_start

    def epoch_seconds(self) -> float:
        """The wall time of the epoch that ends now; the next one starts."""
        now = time.perf_counter()
        seconds, self.epoch_start = now - self.epoch_start, now
        return seconds

    def start_step(self) -> None:
        self.step_start = time.perf_counter()

    def end_step(self) -> None:
        self.steps_time += time.perf_counter() - self.step_start

    def img_per_s(self, images_seen: int) -> float:
        return (images_seen - self.images_at_log) / max(self.steps_time, 1e-9)

    def new_interval(self, images_seen: int) -> None:
        self.steps_time, self.images_at_log = 0.0, images_seen

    @contextmanager
    def grid(self):
        start = time.perf_counter()
        yield
        self.grid_seconds += time.perf_counter() - start

    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.loop_start - self.grid_seconds


class RankDebug:
    """train.rank_debug: each rank writes the sample keys of every step to
    run.dir/debug/keys-rank<r>.txt and, at the end, the hashes of its model and EMA weights to
    debug/state-rank<r>.json, to check that the ranks read disjoint data and ended with the same
    weights. Off, it does nothing."""

    def __init__(self, run_dir: Path, rank: int, world: int, enabled: bool):
        self.dir, self.rank, self.world = run_dir / "debug", rank, world
        self.keys_file = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.keys_file = open(self.dir / f"keys-rank{rank}.txt", "a")

    def batch(self, step: int, keys) -> None:
        if self.keys_file is not None:
            self.keys_file.write(f"{step} " + " ".join(keys) + "\n")

    def finish(self, step: int, model: torch.nn.Module, ema_model: torch.nn.Module) -> None:
        if self.keys_file is None:
            return
        self.keys_file.close()
        summary = {"rank": self.rank, "world": self.world, "step": step,
                   "model": state_hash(model), "ema": state_hash(ema_model)}
        (self.dir / f"state-rank{self.rank}.json").write_text(json.dumps(summary) + "\n")


def build_model(cfg: Config, acc: Accelerator):
    """(model, EMA, optimizer, diffusion), model and optimizer prepared by Accelerate. The same
    initial weights on every rank (DDP would broadcast rank 0's anyway, but the EMA copy is
    taken before that), then a different random stream per rank for everything else."""
    t = cfg.train
    seed_everything(cfg.run.seed)
    model = build_unet(cfg.model.name)
    if t.channels_last:  # NHWC weights make every conv of the model NHWC (oneDNN's fast layout)
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, t.ema_decay)
    seed_everything(cfg.run.seed * acc.num_processes + acc.process_index)
    diffusion = Diffusion.from_config(cfg.diffusion)
    optimizer = make_optimizer(model, t)
    model, optimizer = acc.prepare(model, optimizer)  # not the loader: see EpochData
    ema.model.to(acc.device)
    return model, ema, optimizer, diffusion


def resume(acc: Accelerator, cfg: Config, run_dir: Path, ema, optimizer, total_steps: int):
    """(state, the checkpoint resumed from or None, the metrics.jsonl rows to keep): the latest
    checkpoint's state when run.resume and there is one; the rows of steps that will be redone
    are cut (`metrics_rows_at`; None keeps the file as it is)."""
    state = TrainState()
    resumed_from = latest_checkpoint(run_dir) if cfg.run.resume else None
    keep_rows = 0 if cfg.run.resume else None  # no checkpoint yet: every step gets redone
    if resumed_from is not None:
        state = load_checkpoint(acc, resumed_from, ema)
        set_optimizer_impl(optimizer, cfg.train.optimizer_impl)
        if acc.is_main_process:
            keep_rows = metrics_rows_at(run_dir, state, going_on=state.step < total_steps)
    acc.wait_for_everyone()
    return state, resumed_from, keep_rows


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train(cfg: Config) -> dict:
    """Train (or resume) the DDPM of cfg into run.dir; see the module docstring."""
    acc = make_accelerator(cfg.train.mixed_precision, compile=cfg.train.compile)
    t = cfg.train
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    run_dir = prepare_run_dir(cfg, acc.is_main_process, reads=reads(cfg))
    acc.wait_for_everyone()
    model, ema, optimizer, diffusion = build_model(cfg, acc)
    data = EpochData(cfg, rank, world)
    images_per_step = t.batch_size * t.grad_accum * world
    total_images = t.epochs * data.per_epoch * t.batch_size * world
    total_steps = t.max_steps if t.max_steps is not None else \
        int(t.epochs * data.per_epoch) // t.grad_accum
    state, resumed_from, keep_rows = resume(acc, cfg, run_dir, ema, optimizer, total_steps)
    # the rows of steps that will be redone are cut (and W&B gets the rows it missed)
    tracker = Tracker(run_dir, cfg, "train", enabled=acc.is_main_process, keep_rows=keep_rows,
                      x_axis="images_seen")  # W&B charts training against images seen
    debug = RankDebug(run_dir, rank, world, t.rank_debug)
    if acc.is_main_process:
        print(f"dipddpm train: {cfg.model.name} ({count_parameters(ema.model):,} params), "
              f"{world} process(es) on {device}, {data.per_epoch} batches/epoch/rank, "
              f"{total_steps} steps of {images_per_step} images" +
              (f", resumed from {resumed_from.name}" if resumed_from else ""), flush=True)

    data.start(state.epoch, state.batch_in_epoch)
    noise_gen = torch.Generator(device=device)
    loss_sum = torch.tensor(state.loss_sum, device=device)
    dip_noise = DipNoise(cfg.dip, t.dip_iters) if t.noise == "dip" else None
    final_loss = None
    pbar = bar(total_steps, "train", initial=state.step, disable=not acc.is_main_process)
    clocks = Clocks(state)

    def next_batch():
        if state.batch_in_epoch == data.epoch_len:  # the epoch is done: its line, the next one
            tracker.log({"images_seen": state.images_seen, "epoch": state.epoch + 1,
                         "epoch_time_s": clocks.epoch_seconds()}, state.step)
            state.epoch += 1
            state.batch_in_epoch = 0
            data.start(state.epoch, 0)
        batch = next(data.batches)
        state.batch_in_epoch += 1
        debug.batch(state.step, batch["key"])
        x0 = batch["image"].to(device, non_blocking=True)
        return x0.contiguous(memory_format=torch.channels_last) if t.channels_last else x0

    def gradients(seed: int) -> torch.Tensor:
        """The step's gradients over its grad_accum micro-batches, synced only on the last;
        each loss is scaled so their sum is the mean. Returns the step's mean loss."""
        step_loss = 0.0
        for micro in range(t.grad_accum):
            x0 = next_batch()
            tt = torch.randint(0, diffusion.T, (x0.shape[0],), device=device, generator=noise_gen)
            # each micro-batch of the variant gets its own DIP net (seed + micro)
            noise = training_noise(x0, noise_gen, dip_noise, (seed + micro) % 2**63)
            sync = nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with acc.autocast():
                    loss = diffusion.loss(model, x0, tt, noise)
                acc.backward(loss / t.grad_accum)
            step_loss = step_loss + loss.detach() / t.grad_accum
        return step_loss

    def optimizer_step():
        if t.clip_grad > 0:
            acc.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(acc.unwrap_model(model), ema_decay_at(state.step, state.images_seen, t))

    def log_line(lr: float, boundary: bool) -> float:
        """The log interval's line (its mean loss, lr, img/s); a stop mid-interval is marked
        partial and keeps accumulating, for the resume. Returns the mean loss."""
        mean_loss = (loss_sum / state.loss_count).item()
        clocks.end_step()
        row = {"images_seen": state.images_seen, "epoch": data.epochs_read(state),
               "loss": mean_loss, "lr": lr, "img_per_s": clocks.img_per_s(state.images_seen)}
        if not boundary:
            row["partial"] = True
        tracker.log(row, state.step)
        pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['img_per_s']:.0f}")
        if boundary:
            loss_sum.zero_()
            state.loss_count = 0
            clocks.new_interval(state.images_seen)
        return mean_loss

    def sample_grid():
        n = t.sample_num_images
        if n == 0 or not acc.is_main_process:
            return
        with acc.autocast():  # the same noise for every grid (run.seed): frames of one film
            x, _ = ddim_sample(ema.model, diffusion, (n, 1, 28, 28), steps=t.sample_steps,
                               generator=torch.Generator(device).manual_seed(cfg.run.seed),
                               device=device)
        path = run_dir / SAMPLES_DIR / f"img-{state.images_seen:012d}.png"
        save_grid(x, path)
        tracker.log_image("samples", path, state.step)

    def checkpoint():
        state.loss_sum = loss_sum.item()
        state.metrics_rows = tracker.rows  # what a resume from here keeps (main process)
        state.train_seconds = clocks.train_seconds()
        save_checkpoint(acc, run_dir, state, ema, t.keep_checkpoints)

    while state.step < total_steps:
        clocks.start_step()
        lr = lr_at(state.images_seen + images_per_step, cfg, total_images)  # first step: lr > 0
        set_lr(optimizer, lr)
        seed = step_seed(cfg.run.seed, state.step, rank)
        noise_gen.manual_seed(seed)
        torch.manual_seed(seed)  # dropout, if a model has it
        step_loss = gradients(seed)
        optimizer_step()
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
            final_loss = log_line(lr, boundary)
        else:
            clocks.end_step()
        if crossed(before, state.images_seen, t.sample_every_images) or last:
            with clocks.grid():
                sample_grid()
        if crossed(before, state.images_seen, t.checkpoint_every_images) or last:
            checkpoint()
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
                                epochs=data.epochs_read(state), final_loss=final_loss,
                                world=world, mixed_precision=acc.mixed_precision)
        tracker.summary({"train_seconds": results["train_seconds"],
                         "final_loss": results["final_loss"]})
    debug.finish(state.step, acc.unwrap_model(model), ema.model)
    tracker.finish()
    acc.wait_for_everyone()
    acc.end_training()
    return {"step": state.step, "images_seen": state.images_seen, "run_dir": str(run_dir)}
