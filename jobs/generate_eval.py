"""The generation protocol: FID/KID vs steps for DDPM, DDIM and the DIP start, with memorisation.

  python -m jobs.generate_eval --config configs/generation.yaml protocol.checkpoint=runs/ddpm \
      [run.dir=D protocol.gen_num=1000 protocol.gen_ddim_steps=[10,50] protocol.gen_t0s=[100,500] \
       protocol.gen_priors_dir=data/.../priors/NAME]

Needs the classifier (python -m jobs.train_classifier). Writes D/config.yaml, D/results.json
(schema in dipddpm/protocols/generation.py), D/table.md, D/fid_vs_steps.png, D/samples/*.png,
D/metrics.jsonl and D/wandb/.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.protocols.generation import run_generation


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/generation.yaml"), argv)
    return run_generation(cfg)


if __name__ == "__main__":
    exit_with(main)
