"""The generation protocol: DIP starts vs DDPM/DDIM from noise, FID/KID vs NFE, memorisation.

DIP starts come from training images, held-out test images and no image at all; every arm's
FID/KID is taken against the train statistics and against held-out statistics that exclude the
held-out starts.

  python -m jobs.generate_eval --config configs/generation.yaml protocol.checkpoint=runs/ddpm \
      [run.dir=D protocol.gen_num_images=1000 protocol.gen_ddim_steps=[10,50] \
       protocol.gen_sigma_t0s=[0.3,1.0,3.0] protocol.gen_sources=[train,heldout,data_free] \
       protocol.gen_priors_dir=data/.../priors/NAME]

Needs the classifier (python -m jobs.train_classifier). With --fit-sources-only it only fits the
sources' DIP estimates into protocol.dip_cache (no DDPM, classifier or run dir needed: run it
beside the DDPM's training, and the generation job finds them there). Writes D/config.yaml, D/results.json
(schema in dipddpm/protocols/generation.py; the design in docs/generation.md), D/table.md,
D/fid_vs_steps.png, D/samples/*.png, D/metrics.jsonl and D/wandb/.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.protocols.generation import fit_sources, run_generation


def main(argv=None):
    parser = job_parser(__doc__.splitlines()[0], "configs/generation.yaml")
    parser.add_argument("--fit-sources-only", action="store_true",
                        help="fit the sources' DIP estimates into protocol.dip_cache, then stop")
    cfg, args = parse_config(parser, argv)
    return fit_sources(cfg) if args.fit_sources_only else run_generation(cfg)


if __name__ == "__main__":
    exit_with(main)
