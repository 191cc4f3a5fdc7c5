"""Run under `accelerate launch`: each rank reads one epoch and writes the keys it saw."""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from dipddpm.data import make_loader


def main(data_dir: str, split: str, out_dir: str, batch_size: int, num_workers: int):
    acc = Accelerator(cpu=not torch.cuda.is_available())
    loader = make_loader(data_dir, split, batch_size, rank=acc.process_index,
                         world_size=acc.num_processes, num_workers=num_workers, seed=1, epoch=0,
                         shuffle_buffer=100)
    keys, batches = [], 0
    for batch in loader:
        keys.extend(batch["key"])
        batches += 1
    out = Path(out_dir) / f"rank{acc.process_index}.json"
    out.write_text(json.dumps({"world": acc.num_processes, "batches": batches,
                               "len": len(loader), "keys": keys}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
