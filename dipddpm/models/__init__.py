"""Networks: the DDPM U-Nets (unet.py) and the DIP skip net (dip.py)."""
