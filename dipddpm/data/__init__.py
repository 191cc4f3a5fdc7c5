"""FashionMNIST: IDX reading, webdataset shards + manifest, the streaming loader."""
from dipddpm.data.idx import CLASS_NAMES, DataError
from dipddpm.data.shards import load_manifest, verify_dataset
from dipddpm.data.stream import batches_per_epoch, load_split, make_loader

__all__ = ["CLASS_NAMES", "DataError", "load_manifest", "verify_dataset", "batches_per_epoch",
           "load_split", "make_loader"]
