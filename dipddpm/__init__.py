"""dipddpm: Deep Image Prior starts for DDPMs on FashionMNIST, at cluster scale."""

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "runs", "cli", "tracking", "registry", "artifacts", "progress", "precision"),
    ("data", "models", "diffusion"),
    ("dip", "train", "evaluate"),
    ("protocols",),
    ("report",),
    ("study", "launch"),
)
"""The library's layers, lowest first, by top-level module or package of `dipddpm`. A module
imports only from its own layer or the ones below it, never upward (tests/test_layers.py walks
every import, module- and function-level, and holds the library to this):

- ground: the config schema (`config`), run dirs and atomic files (`runs`), the job argument
  convention (`cli`), metrics.jsonl and W&B (`tracking`), the names the schema validates
  against (`registry`: model sizes, restoration tasks) and the writers every layer shares
  (`artifacts`: PNG figures and image grids, table number formatting), and the progress bar
  every long loop uses (`progress`), and which precision a fast path computes in on this
  machine (`precision`);
- components: shards and loaders (`data`), networks (`models`), schedules and samplers
  (`diffusion`);
- what is built from them: DIP fitting and priors (`dip`), DDPM training and sampling from a
  checkpoint (`train`), metrics, the FID classifier, FLOPs and statistics (`evaluate`);
- the experiments (`protocols`: restoration and generation);
- the report, written from run dirs (`report`);
- the whole study (`study`) and the launcher (`launch`: plans, SLURM arrays, status, the
  selftest), which runs any job by name. They share the top layer because the study submits
  its stages through the launcher; nothing below imports either.

Above the library sit the entry points, `jobs/` (one thin module per job, none importing
another), `launch/` (command lines over `dipddpm.launch`) and `bench/`; the library imports
none of them. The one place it names a job is `dipddpm.launch.task.JobTask`, which imports
`jobs.<name>` by name at run time, so any job runs under the launcher unchanged.
"""
