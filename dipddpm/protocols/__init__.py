"""The study's experiments done on the sound formulation (ANCHORS: CCDF / SDEdit starts).

restoration.py  DIP, DIP-start and baseline arms on degraded test images (PSNR/SSIM vs steps
                and vs wall time including the DIP fit)
generation.py   FID/KID vs steps for DDPM, DDIM and the DIP start from training priors, with
                the memorisation check beside the DIP start
arms.py         the shared pieces: [0,1] <-> [-1,1], start states, cheap estimates, chains
"""
