"""Write FashionMNIST as webdataset shards + manifest.json.

  python -m jobs.prepare_data --source /path/to/fashion-mnist-idx --out data/fashion-mnist
  python -m jobs.prepare_data --source torchvision --out data/fashion-mnist
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.data.prepare import prepare_data, summary


def main(argv=None):
    parser = job_parser(__doc__.splitlines()[0], "configs/base.yaml")
    parser.add_argument("--source", help="IDX folder or 'torchvision' (sets data.source)")
    parser.add_argument("--out", help="output data dir (sets data.dir)")
    parser.add_argument("--shard-size", type=int, help="images per shard (sets data.shard_size)")

    def flags(a):
        return ([f"data.source={a.source}"] if a.source else []) + \
               ([f"data.dir={a.out}"] if a.out else []) + \
               ([f"data.shard_size={a.shard_size}"] if a.shard_size is not None else [])

    cfg, _ = parse_config(parser, argv, flags)
    manifest = prepare_data(cfg)
    print(summary(manifest))
    return manifest


if __name__ == "__main__":
    exit_with(main)
