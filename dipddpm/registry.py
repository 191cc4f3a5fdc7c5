"""Names the config schema validates against, kept below the schema and the components.

`dipddpm.config` checks `model.name` and `protocol.tasks` against these tuples without importing
the models or the degradations; `dipddpm.models.unet` and `dipddpm.dip.degrade` build their
tables from the same names (the U-Net registry refuses to import if its sizes and these names
ever disagree).
"""

UNET_NAMES = ("unet-tiny", "unet-small", "unet-medium")  # sizes in dipddpm.models.unet
TASKS = ("denoise", "inpaint_box", "inpaint_random")  # restoration tasks, dipddpm.dip.degrade
