"""Train the DDPM (U-Net, epsilon prediction) on the FashionMNIST train shards.

  python -m jobs.train --config configs/ddpm.yaml run.dir=runs/ddpm
  accelerate launch -m jobs.train --config configs/ddpm.yaml run.dir=runs/ddpm
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m jobs.train ...

Rerunning with the same run.dir resumes from its latest checkpoint (run.resume=false starts
over); one whose settings change results is refused, a longer one (train.epochs, max_steps)
goes on (dipddpm/runs.py).
Writes run.dir/{config.yaml, metrics.jsonl, samples/, checkpoints/, ema.pt, wandb/}.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.train import train


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/ddpm.yaml"), argv)
    return train(cfg)


if __name__ == "__main__":
    exit_with(main)
