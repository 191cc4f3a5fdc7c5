"""FashionMNIST as webdataset tar shards plus a manifest that makes a data dir verifiable.

Layout of a data dir:
  train-000000.tar ... test-000003.tar
                  samples {__key__: "train-000123", npy: uint8 28x28, cls: label}
  manifest.json   counts per split and class, per shard: count, first index, sha256, bytes
                  (manifests written before it recorded bytes still load)
  .verified.json  shards whose sha256 was checked: {name: [bytes, mtime_ns, sha256]}

Readers check what they read against the manifest (`checked_shards`, `shard_samples`): every
open, each shard's size (and, through .verified.json, that it is the file that was hashed) and,
while reading, its sample count and tar structure; a shard's sha256 once per content (a changed
size or mtime hashes it again; the list is kept in the data dir when it is writable, else in the
process). A bad shard is one line naming it and the command that rebuilds exactly the bad
shards (`python -m jobs.prepare_data` keeps every shard that verifies).

manifest.json is written last, atomically: it is the mark of a complete data dir. Shards are
written to temporary names and renamed; finished shards are recorded in .manifest.partial.json
as they land, so a killed run resumes where it stopped. Tar members carry fixed metadata
(mtime 0), so rebuilding a shard from the same input reproduces its sha256 exactly.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from dipddpm.data.idx import NUM_CLASSES, DataError
from dipddpm.progress import bar as progress_bar
from dipddpm.runs import atomic_path, atomic_write_json, ensure_dir, read_json

MANIFEST = "manifest.json"
PARTIAL = ".manifest.partial.json"
VERIFIED = ".verified.json"
SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")
SPLITS = ("train", "test")


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def _write_shard(path: Path, split: str, first: int, images: np.ndarray, labels: np.ndarray):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, mtime=0, user="", group="") as sink:
                for i, (image, label) in enumerate(zip(images, labels)):
                    sink.write({"__key__": sample_key(split, first + i),
                                "npy": _npy_bytes(image), "cls": int(label)})
            f.flush()
            os.fsync(f.fileno())


def _plan(split: str, n: int, shard_size: int) -> list[dict]:
    return [{"name": shard_name(split, i), "first": start, "count": min(shard_size, n - start)}
            for i, start in enumerate(range(0, n, shard_size))]


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.astype(np.uint8).tobytes()).hexdigest()


def write_dataset(out_dir: str | os.PathLike, arrays: dict, shard_size: int,
                  progress: bool = True) -> tuple[dict, int]:
    """Write (or finish, or repair) the shards of every split in `arrays` and the manifest.

    `arrays` maps split -> (images uint8 [N,28,28], labels int [N]), already validated.
    Shards that verify against the recorded sha256 are kept; everything else is rebuilt.
    Returns the manifest and how many shards were kept.
    """
    out = ensure_dir(out_dir, "data.dir (--out)")
    splits = {s: {"fingerprint": _fingerprint(*arrays[s]), "plan": _plan(s, len(arrays[s][0]), shard_size)}
              for s in SPLITS if s in arrays}
    recorded = _recorded_entries(out, splits)
    # While anything is rebuilt the dir must not look complete: drop the manifest first.
    if (out / MANIFEST).exists():
        os.unlink(out / MANIFEST)
    planned = {e["name"] for s in splits.values() for e in s["plan"]}
    for stale in out.iterdir():  # shards of an older plan, temp files of a killed run
        if (SHARD_RE.match(stale.name) and stale.name not in planned) or \
                (stale.name.startswith(".") and stale.name.endswith(".tmp")):
            stale.unlink()

    done: dict[str, dict] = {}
    kept = 0
    todo = [(s, e) for s, info in splits.items() for e in info["plan"]]
    bar = progress_bar(len(todo), f"shards -> {out}", iterable=todo, unit="shard",
                       disable=not progress)
    for split, entry in bar:
        name, path = entry["name"], out / entry["name"]
        rec = recorded.get(name)
        if rec and path.exists() and sha256_file(path) == rec["sha256"]:
            done[name] = dict(rec, bytes=path.stat().st_size)
            kept += 1
            continue
        images, labels = arrays[split]
        sl = slice(entry["first"], entry["first"] + entry["count"])
        _write_shard(path, split, entry["first"], images[sl], labels[sl])
        done[name] = dict(entry, sha256=sha256_file(path), bytes=path.stat().st_size,
                          per_class=_per_class(labels[sl]), fingerprint=splits[split]["fingerprint"])
        atomic_write_json(out / PARTIAL, {"shard_size": shard_size, "shards": done})
    manifest = {
        "format": 1,
        "dataset": "fashion-mnist",
        "sample": {"key": "<split>-<index:06d>", "npy": "uint8 [28, 28]", "cls": "int 0..9"},
        "shard_size": shard_size,
        "splits": {
            s: {"count": len(arrays[s][0]), "per_class": _per_class(arrays[s][1]),
                "fingerprint": info["fingerprint"],
                "shards": [done[e["name"]] for e in info["plan"]]}
            for s, info in splits.items()
        },
    }
    atomic_write_json(out / MANIFEST, manifest)
    if (out / PARTIAL).exists():
        os.unlink(out / PARTIAL)
    # every shard was hashed from disk just now: readers need not hash them again
    _remember(out, {e["name"]: _stamp(out / e["name"]) + [e["sha256"]] for e in done.values()})
    return manifest, kept


def _per_class(labels: np.ndarray) -> dict:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)
    return {str(c): int(n) for c, n in enumerate(counts)}


def _recorded_entries(out: Path, splits: dict) -> dict:
    """Shard entries from an earlier manifest or partial run that still match the plan."""
    entries = {}
    for name in (MANIFEST, PARTIAL):
        path = out / name
        if not path.exists():
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue  # unreadable bookkeeping: rebuild what it described
        if name == MANIFEST:
            for s in data.get("splits", {}).values():
                for e in s.get("shards", []):
                    entries[e["name"]] = dict(e, fingerprint=s.get("fingerprint"))
        else:
            entries.update(data.get("shards", {}))
    planned = {e["name"]: (s, e) for s, info in splits.items() for e in info["plan"]}
    keep = {}
    for name, e in entries.items():
        if name not in planned:
            continue
        split, plan = planned[name]
        same = (e.get("first") == plan["first"] and e.get("count") == plan["count"]
                and e.get("fingerprint") == splits[split]["fingerprint"] and "sha256" in e)
        if same:
            keep[name] = e
    return keep


def rebuild_hint(data_dir) -> str:
    return f"rebuild: python -m jobs.prepare_data --source SRC --out {data_dir}"


def _manifest_problem(manifest) -> str | None:
    """Why a parsed manifest.json is not one of a data dir (None when it is)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return "no 'splits' mapping"
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            return f"splits.{split} has no 'shards' list"
        for i, e in enumerate(shards):
            ok = (isinstance(e, dict) and isinstance(e.get("name"), str)
                  and SHARD_RE.match(e["name"]) and isinstance(e.get("count"), int)
                  and isinstance(e.get("sha256"), str)
                  and isinstance(e.get("bytes", 0), int))
            if not ok:
                return f"splits.{split}.shards[{i}] is not a shard entry (name, count, sha256)"
    return None


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: missing; data.dir is not a complete data dir "
                        f"(run: python -m jobs.prepare_data --source SRC --out {data_dir})")
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); "
                        f"{rebuild_hint(data_dir)}") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror})") from None
    why = _manifest_problem(manifest)
    if why:
        raise DataError(f"{path}: not a dataset manifest ({why}); {rebuild_hint(data_dir)}")
    return manifest


def split_shards(manifest: dict, split: str, data_dir) -> list[dict]:
    if split not in manifest["splits"]:
        raise DataError(f"{Path(data_dir) / MANIFEST}: no split {split!r} "
                        f"(has {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


# ----------------------------------------------------------------------------- checked reading

_VERIFIED: dict = {}  # this process's verified shards: (path, bytes, mtime_ns) -> sha256


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _cached(folder: Path) -> dict:
    try:
        data = read_json(folder / VERIFIED)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(folder: Path, entries: dict) -> None:
    """Add {name: [bytes, mtime_ns, sha256]} to the folder's verified list (skipped when the
    folder is read-only; concurrent writers may drop each other's entries: they hash again)."""
    for name, (size, mtime, sha) in entries.items():
        _VERIFIED[(str(folder.resolve() / name), size, mtime)] = sha
    try:
        atomic_write_json(folder / VERIFIED, {**_cached(folder), **entries})
    except OSError:
        pass


def checked_shards(folder, entries: list[dict], hint: str) -> list[dict]:
    """Check the shards of `entries` (manifest entries in `folder`) before reading them: each
    exists with the manifest's size, and its sha256 matches (hashed once per content, see the
    module docstring). Raises DataError naming the first bad shard and `hint`."""
    folder = Path(folder)
    on_disk = None
    fresh = {}
    for e in entries:
        path = folder / e["name"]
        try:
            size, mtime = _stamp(path)
        except FileNotFoundError:
            raise DataError(f"{path}: missing; {hint}") from None
        if not path.is_file():
            raise DataError(f"{path}: not a file; {hint}")
        if "bytes" in e and size != e["bytes"]:
            raise DataError(f"{path}: {size} bytes, {MANIFEST} says {e['bytes']}; {hint}")
        if _VERIFIED.get((str(path.resolve()), size, mtime)) == e["sha256"]:
            continue
        if on_disk is None:
            on_disk = _cached(folder)
        if on_disk.get(e["name"]) == [size, mtime, e["sha256"]]:
            _VERIFIED[(str(path.resolve()), size, mtime)] = e["sha256"]
            continue
        if sha256_file(path) != e["sha256"]:
            raise DataError(f"{path}: sha256 differs from {MANIFEST}; {hint}")
        fresh[e["name"]] = [size, mtime, e["sha256"]]
    if fresh:
        _remember(folder, fresh)
    return entries


def shard_samples(folder, entries: list[dict], hint: str) -> Iterator[dict]:
    """The samples of the shards of `entries`, in order, each shard's sample count checked
    against its entry: a tar error, or a shard that ends early or runs long, is a DataError
    naming the shard and `hint` (a tar cut at a member boundary reads as a normal end)."""
    for e in entries:
        path = Path(folder) / e["name"]
        n = 0
        try:
            for sample in tarfile_samples(iter([{"url": str(path)}])):
                n += 1
                if n > e["count"]:
                    break
                yield sample
        except (tarfile.TarError, OSError, EOFError) as err:
            why = err.args[0] if err.args and isinstance(err.args[0], str) \
                else type(err).__name__
            raise DataError(f"{path}: not a readable tar after {n} samples "
                            f"({why.split(' @ ')[0]}); {hint}") from None
        if n != e["count"]:
            raise DataError(f"{path}: {'more than ' if n > e['count'] else ''}{n} samples, "
                            f"{MANIFEST} says {e['count']}; {hint}")


def split_entries(data_dir, split: str) -> list[dict]:
    """The checked manifest entries of a split of a data dir (`checked_shards`)."""
    shards = split_shards(load_manifest(data_dir), split, data_dir)
    return checked_shards(data_dir, shards, rebuild_hint(data_dir))


def verify_dataset(data_dir: str | os.PathLike) -> list[str]:
    """Names of shards that are missing or whose sha256 differs from the manifest."""
    manifest = load_manifest(data_dir)
    bad = []
    for split in manifest["splits"]:
        for e in split_shards(manifest, split, data_dir):
            path = Path(data_dir) / e["name"]
            if not path.exists() or sha256_file(path) != e["sha256"]:
                bad.append(e["name"])
    return bad
