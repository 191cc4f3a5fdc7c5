"""Draw samples from trained EMA weights: N images -> .npz + PNG grid + .json.

  python -m jobs.sample --config configs/ddpm.yaml run.dir=runs/ddpm            # that run's weights
  python -m jobs.sample run.dir=runs/ddpm-samples sample.checkpoint=runs/ddpm sample.steps=20
  python -m jobs.sample run.dir=runs/ddpm sample.sampler=ddpm sample.t0=100    # from test images

The model and diffusion come from the weights' run (an override that disagrees is refused).
See dipddpm/train/sampling.py for where the settings come from and what is written.
"""
from dipddpm.cli import exit_with, job_parser, override_keys, parse_config
from dipddpm.train.sampling import draw_samples


def main(argv=None):
    cfg, args = parse_config(job_parser(__doc__.splitlines()[0], "configs/ddpm.yaml"), argv)
    return draw_samples(cfg, explicit=override_keys(args.overrides))


if __name__ == "__main__":
    exit_with(main)
