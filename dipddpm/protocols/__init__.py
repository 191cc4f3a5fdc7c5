"""The study's experiments done on the sound formulation: a DIP estimate diffused to a noise
level and denoised by a DDPM trained as usual (CCDF, Chung et al. 2022; SDEdit, Meng et al. 2022).

restoration.py  DIP starts against the baselines that need no DIP (direct start and posterior
                mean, blur start, noise start) on degraded test images, at equal compute in
                FLOPs, with bootstrap intervals and the answer per task (docs/protocols.md)
generation.py   FID/KID vs steps for DDPM, DDIM and the DIP start, with the memorisation check
                beside the DIP start
arms.py         the shared pieces: [0,1] <-> [-1,1], starts by noise level, the estimate's
                error, cheap estimates, chains
"""
