"""DIP priors for the data shards: one shard (`shard=K`, an array task) or all of them.

  python -m jobs.precompute_priors --config configs/priors.yaml [shard=K] [key=value ...]

Writes data.dir/priors/<priors.name>/ (tars with the shard's keys, entries/, manifest.json; see
dipddpm/dip/priors.py) and, in run.dir, the resolved config and one metrics line per shard
(each written once, also over reruns).
Idempotent and resumable: rerun the same command after a kill or a requeue.
"""
import sys

from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.dip.priors import READS, precompute
from dipddpm.runs import prepare_run_dir
from dipddpm.tracking import Tracker


def main(argv=None):
    # `shard=K` is the array-task spelling of priors.shard=K
    argv = [f"priors.{a}" if a.startswith("shard=") else a
            for a in (sys.argv[1:] if argv is None else argv)]
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/priors.yaml"), argv)
    run_dir = prepare_run_dir(cfg, reads=READS)
    result = precompute(cfg)
    # one line per shard, once: a rerun (after a kill, a requeue) keeps the lines there are
    # and logs the rest; W&B gets what it missed (dipddpm/tracking.py)
    with Tracker(run_dir, cfg, job_type="precompute_priors") as tracker:
        for i, e in enumerate(result["shards"]):
            if i in tracker.logged_steps:
                continue
            tracker.log({k: e[k] for k in ("count", "iters_mean", "psnr_clean_mean",
                                           "psnr_obs_mean", "noisy_psnr_mean", "wall_s")
                         if k in e} | {"shard": e["name"], "skipped": e["skipped"]}, step=i)
    for e in result["shards"]:
        state = "verified, skipped" if e["skipped"] else f"{e['wall_s']:.1f} s"
        print(f"{e['name']}: {e['count']} priors, PSNR to clean {e['psnr_clean_mean']:.2f} dB "
              f"(noisy {e['noisy_psnr_mean']:.2f} dB), {state}")
    return result


if __name__ == "__main__":
    exit_with(main)
