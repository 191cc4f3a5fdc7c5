"""Train the FashionMNIST classifier whose features give FID/KID, and report its FID floors.

  python -m jobs.train_classifier --config configs/classifier.yaml [data.dir=...]

Caches classifier.pt + metrics.json (test accuracy) in <data.dir>/classifier/ (classifier.dir);
a rerun with the same settings reuses the verified checkpoint, classifier.force=true retrains.
Then computes the real-vs-real FID floor at each N of classifier.floor_num_images (cached beside the
checkpoint) and writes run.dir/results.json:
  {"classifier": metrics.json + "reused", "floors": [{"n", "fid", "fid_vs_train", "kid", ...}]}
and logs the run (run.dir/metrics.jsonl and W&B, job_type train_classifier): the training loss
against images seen, the floors as a table, the test accuracy in the summary.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.evaluate import classifier_dir, load_classifier, real_vs_real_floor, train_classifier
from dipddpm.runs import RESULTS_FILE, atomic_write_json, prepare_run_dir
from dipddpm.tracking import Tracker

FLOOR_COLUMNS = ("n", "fid", "fid_vs_train", "kid")


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/classifier.yaml"), argv)
    run_dir = prepare_run_dir(cfg, reads=("run", "data.dir", "classifier"))
    # a rerun (e.g. classifier.force=true) replaces the rows of the run before
    with Tracker(run_dir, cfg, "train_classifier", keep_rows=0, x_axis="images_seen") as tracker:
        metrics = train_classifier(cfg, tracker=tracker)
        clf = load_classifier(classifier_dir(cfg))
        floors = []
        for n in cfg.classifier.floor_num_images:
            f = real_vs_real_floor(clf, cfg.data.dir, n, seed=cfg.run.seed,
                                   kid_subset_size=cfg.classifier.kid_subset_size,
                                   kid_num_subsets=cfg.classifier.kid_num_subsets)
            print(f"real-vs-real floor at N={n}: FID {f['fid']:.3f} (test vs train, {n} each), "
                  f"FID vs all-train stats {f['fid_vs_train']:.3f}, KID {f['kid']:.5f}")
            floors.append(f)
        results = {"classifier": metrics, "floors": floors}
        atomic_write_json(run_dir / RESULTS_FILE, results)
        tracker.log_table("floors", FLOOR_COLUMNS, [[f[k] for k in FLOOR_COLUMNS] for f in floors])
        tracker.summary({"test_accuracy": metrics["test_accuracy"], "reused": metrics["reused"]})
    return results


if __name__ == "__main__":
    exit_with(main)
