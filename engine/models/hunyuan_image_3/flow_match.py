"""Flow-matching sampler pieces for HunyuanImage-3.0 image generation, as small pure functions.

The engine denoises many requests in one batch, each at its own step, so the sampler is not an object
with a step counter: every quantity a step needs (sigma pair, model timesteps, guidance value, noise) is
computed from per-request inputs. The arithmetic follows the official FlowMatchDiscreteScheduler (Euler,
reverse schedule, SD3 shift) and pipeline dtype for dtype, so the official golden tensors are reproduced
bit for bit (golden/tiny and golden/tiny_distil READMEs).

Convention: x_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is pure noise, the model predicts v = eps - x0,
and one Euler step is x <- x + v (sigma_next - sigma).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
"""Model timesteps are sigma scaled by this (the official scheduler's num_train_timesteps)."""


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The num_steps + 1 noise levels from 1 down to 0, in float32.

    linspace(1, 0, N+1) then the SD3 shift s*sigma / (1 + (s-1)*sigma), evaluated with the same fp32
    operations as the official scheduler so the values match it exactly (shift 1 leaves them unshifted).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    if shift != 1.0:
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Model timestep t_i = 1000 * sigma_i for the N steps (the final sigma 0 is never fed)."""
    return (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def timesteps_r_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """MeanFlow interval end r_i = 1000 * sigma_{i+1} (0 at the last step); only Distil models use it."""
    return (sigmas[1:] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """One request's whole schedule: sigmas [N+1], timesteps t [N] and MeanFlow ends r [N], all fp32 CPU."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    timesteps_r: torch.Tensor

    @classmethod
    def create(cls, num_steps: int, shift: float = 3.0) -> FlowMatchSchedule:
        sigmas = sigma_schedule(num_steps, shift)
        return cls(sigmas, timesteps_from_sigmas(sigmas), timesteps_r_from_sigmas(sigmas))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def sigma_pair(self, step: int) -> tuple[float, float]:
        """(sigma_i, sigma_{i+1}) for step i, as Python floats holding the exact fp32 values."""
        return float(self.sigmas[step]), float(self.sigmas[step + 1])


def _as_f32(x: float | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    return torch.tensor(x, dtype=torch.float32)


def euler_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """One Euler update in fp32: latents + velocity * (sigma_next - sigma).

    The step size is the fp32 difference of the two fp32 sigmas, as in the official scheduler (a
    double-precision difference would round differently). sigma/sigma_next may be scalars or 1-D
    tensors with one value per batch row (requests at different steps in one batch). Scalars stay on
    the CPU so a CUDA kernel takes them as arguments without a device sync.
    """
    dt = _as_f32(sigma_next) - _as_f32(sigma)
    if dt.ndim == 1:
        dt = dt.to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
    elif dt.ndim != 0:
        raise ValueError(f"sigma must be a scalar or a 1-D per-row tensor, got shape {tuple(dt.shape)}")
    return latents.to(torch.float32) + velocity.to(torch.float32) * dt


def uses_cfg_batch(guidance_scale: float, cfg_distilled: bool) -> bool:
    """Whether a request needs an unconditional row: classic CFG only, and only when the scale exceeds 1."""
    return (not cfg_distilled) and guidance_scale > 1.0


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale * (cond - uncond), in fp32.

    As in the official pipeline, guidance applies only when scale > 1; otherwise there is no uncond row
    and the conditional prediction is used unchanged.
    """
    cond = cond.to(torch.float32)
    if scale <= 1.0:
        return cond
    if uncond is None:
        raise ValueError(f"guidance scale {scale} > 1 needs the unconditional prediction")
    uncond = uncond.to(torch.float32)
    return uncond + scale * (cond - uncond)


def guidance_value(scale: float) -> float:
    """The value the Distil `<guidance>` embedder sees: 1000 * scale rounded to bfloat16, as official.

    The official pipeline builds this number as a bf16 tensor, so 2.5 -> 2500 -> 2496.0. Reproducing the
    rounding is required to match the official images.
    """
    return float(torch.tensor([NUM_TRAIN_TIMESTEPS * float(scale)], dtype=torch.bfloat16).item())


def noise_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator. On the CPU (our default) one seed gives the same noise on every machine
    and in every batch; the official GPU pipeline seeds a generator on the model's device instead, so pass
    device="cuda" to reproduce an official GPU run's noise exactly."""
    return torch.Generator(device=device).manual_seed(int(seed))


def initial_noise(
    seed: int | torch.Generator,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Initial latents drawn like the official pipeline, returned in fp32 on `device`.

    A standard normal drawn in bfloat16 on the generator's device (what diffusers' randn_tensor does:
    a CPU generator draws on the CPU, then the result moves), upcast losslessly to fp32. `shape` is one
    request's [1, C, H/16, W/16]. Pass an int seed for a fresh CPU generator, or the request's generator
    when it was used first for something else: with condition images the official code samples each VAE
    posterior (fp32 randn of the posterior's shape, image by image) from the same generator BEFORE the
    noise (golden tiny_distil/gen).
    """
    generator = seed if isinstance(seed, torch.Generator) else noise_generator(seed)
    noise = torch.randn(
        tuple(int(s) for s in shape), generator=generator, dtype=torch.bfloat16, device=generator.device
    )
    return noise.to(dtype=torch.float32).to(device)
