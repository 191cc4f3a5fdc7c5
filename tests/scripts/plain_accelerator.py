"""Run under torchrun on a CPU host: an Accelerator built with cpu=False sees one process per
rank (each rank believes it trains alone, num_processes == 1), and make_accelerator must refuse to
train like that."""
from dipddpm.train.loop import make_accelerator

make_accelerator("no", cpu=False)
print("trained alone without noticing")
