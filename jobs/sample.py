"""Draw samples from trained EMA weights: N images -> .npz + PNG grid + .json.

  python -m jobs.sample --config configs/ddpm.yaml run.dir=runs/ddpm            # that run's weights
  python -m jobs.sample run.dir=runs/ddpm-samples sample.checkpoint=runs/ddpm sample.steps=20
  python -m jobs.sample run.dir=runs/ddpm sample.sampler=ddpm sample.t0=100    # from test images

See dipddpm/train/generate.py for where the settings come from and what is written.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.train.generate import generate


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/ddpm.yaml"), argv)
    return generate(cfg)


if __name__ == "__main__":
    exit_with(main)
