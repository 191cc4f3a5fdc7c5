"""FID against training time: classifier FID/KID of a training run's kept EMA snapshots.

  python -m jobs.fid_curve --config configs/generation.yaml protocol.checkpoint=runs/ddpm \
      [run.dir=D protocol.curve_num_images=1000 protocol.curve_steps=50 protocol.curve_every=2]

The run must have kept snapshots (train.weights_every_images); needs the classifier
(python -m jobs.train_classifier). Writes D/config.yaml, D/results.json (schema in
dipddpm/protocols/fid_curve.py), D/fid_vs_epochs.png, D/samples/*.png and D/wandb/.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.protocols.fid_curve import run_fid_curve


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/generation.yaml"), argv)
    return run_fid_curve(cfg)


if __name__ == "__main__":
    exit_with(main)
