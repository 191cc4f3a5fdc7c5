"""Fit the DIP to noisy FashionMNIST test images: PSNR vs iterations, the study's first table.

  python -m jobs.fit_dip --config configs/dip_denoise.yaml [run.dir=D data.dir=S
      dip.num_images=N dip.iters=I dip.sigmas=[25,50] dip.batch_size=B]

Writes D/config.yaml, D/results.json (schema in dipddpm/dip/table.py), D/table.md (ours beside
the study's numbers), D/psnr.png, D/metrics.jsonl and D/wandb/.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.dip.table import run_dip_table


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/dip_denoise.yaml"), argv)
    return run_dip_table(cfg)


if __name__ == "__main__":
    exit_with(main)
