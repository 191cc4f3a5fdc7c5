"""The restoration protocol: DIP, DIP-start diffusion and baselines on degraded test images.

  python -m jobs.restore --config configs/restore.yaml protocol.checkpoint=runs/ddpm \
      [run.dir=D protocol.num_images=32 protocol.tasks=[denoise] protocol.sigmas=[25] \
       protocol.start_c=[1,2] protocol.sigma_t0s=[0.2] protocol.steps=[5,20] \
       protocol.priors_dir=data/.../priors/NAME]

Writes D/config.yaml, D/results.json (schema in dipddpm/protocols/restoration.py), D/table.md
(the answer first), D/front_<task>.png, D/metrics.jsonl and D/wandb/; docs/protocols.md says
how. A missing checkpoint or an arm that cannot run is one line and exit 2, nothing written.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.protocols.restoration import run_restoration


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/restore.yaml"), argv)
    return run_restoration(cfg)


if __name__ == "__main__":
    exit_with(main)
