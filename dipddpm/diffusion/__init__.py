"""DDPM schedules, losses and samplers: the API the restoration experiments build on.

Timestep convention
    t is 0-indexed: t in [0, T-1]; index t is the paper's step t+1.
    abar[t] = prod_{s<=t} (1 - beta[s]);  q(x_t | x_0) = N(sqrt(abar[t]) x_0, (1 - abar[t]) I).
    The network is called as model(x_t, t) with t an int64 tensor [B]; images are in [-1, 1].
t0 (where a sampler starts), in the paper's 1-indexed steps, t0 in [1, T]
    The chain starts at index t0-1 from x = sqrt(abar[t0-1]) x0_hat + sqrt(1-abar[t0-1]) eps,
    which is the paper's x_{t0} = sqrt(abar_{t0}) x0_hat + sqrt(1-abar_{t0}) eps.
    Ancestral DDPM from t0 makes exactly t0 network calls (nfe = t0).
    t0 = T, or t0 = None, is ordinary sampling from N(0, I): x0_hat is then not used.
    Noise levels: step t's noise-to-signal ratio is s_t = sqrt((1 - abar[t]) / abar[t]) in
    [-1, 1] units (`noise_levels`), since x_t / sqrt(abar[t]) = x0 + s_t eps. A start given by
    its noise level sigma starts at the index whose s_t is nearest (`t_for_sigma`), t0 = that
    index + 1; `sigma_at(diffusion, t0)` is the level a 1-indexed t0 really has.

Building
    diffusion = Diffusion.from_config(cfg.diffusion)           # or Diffusion(betas, "eps", "mse")
    linear_betas(T, beta_start, beta_end, scale=True), cosine_betas(T)
Forward process, posterior, parameterisations (all tensors [B,C,H,W], t int64 [B])
    diffusion.q_sample(x0, t, noise) -> x_t
    diffusion.posterior_mean_variance(x0, x_t, t) -> (mean, var)   # q(x_{t-1} | x_t, x_0)
    diffusion.predict_x0_eps(x_t, t, model_out) -> (x0, eps)       # eps or v prediction
    diffusion.target(x0, t, noise)                                 # eps, or v
    diffusion.loss(model, x0, t, noise) -> scalar                  # MSE or Huber
Samplers (return (samples, nfe); deterministic for a seed)
    ddpm_sample(model, diffusion, shape, *, x0_hat=None, t0=None, x_start=None,
                generator=None, clip_x0=True, device=None, dtype=torch.float32)
    ddim_sample(model, diffusion, shape, *, steps=50, eta=0.0, x0_hat=None, t0=None,
                x_start=None, generator=None, clip_x0=True, device=None, dtype=torch.float32)
    sample(model, diffusion, shape, sampler="ddim"|"ddpm", steps=50, eta=0.0, **same keywords)
    - shape may be None when x0_hat or x_start is given (their shape is used).
    - generator: a torch.Generator on the samples' device, or an int seed. The first draw is
      the start noise, then one draw per noise-adding step, so DDPM and DDIM(eta=1, all steps)
      agree for the same seed.
    - x_start: the state at index t0-1 given directly (no noise added), e.g. a noisy image y
      scaled by sqrt(abar[t0-1]) when its noise matches 1-abar (denoising as a direct start).
    - DDIM visits ddim_timesteps(t0, steps): evenly spaced from t0-1 down to 0, both ends
      included, so nfe = min(steps, t0).
    - clip_x0 clamps the predicted x0 to [-1, 1] at every step (the DDPM reference does).
    Sampling runs under torch.no_grad; wrap the call in autocast for bf16 sampling.
"""
from dipddpm.diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample, sample, start_state
from dipddpm.diffusion.schedule import (Diffusion, cosine_betas, linear_betas, noise_levels,
                                        sigma_at, t_for_sigma)

__all__ = ["Diffusion", "linear_betas", "cosine_betas", "noise_levels", "t_for_sigma", "sigma_at",
           "ddpm_sample",
           "ddim_sample", "ddim_timesteps", "sample", "start_state"]
