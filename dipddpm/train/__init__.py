"""DDPM training with Accelerate: the loop, EMA, checkpoints (see loop.py for exact resume)."""
from dipddpm.train.checkpoint import (TrainState, find_weights, latest_checkpoint,
                                      load_ema_weights)
from dipddpm.train.ema import EMA
from dipddpm.train.loop import train

__all__ = ["train", "EMA", "TrainState", "latest_checkpoint", "find_weights", "load_ema_weights"]
