"""The flow-matching sampler pieces reproduce the official scheduler and pipeline bit for bit (golden)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffgentor.engine.models.hunyuan_image_3.flow_match import (
    FlowMatchSchedule,
    cfg_combine,
    euler_step,
    guidance_value,
    initial_noise,
    noise_generator,
    sigma_schedule,
    timesteps_from_sigmas,
    timesteps_r_from_sigmas,
    uses_cfg_batch,
)


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------------------- schedule


def test_tiny_schedule_matches_golden_exactly(golden_tiny):
    gen = _manifest(golden_tiny)["files"]["image_gen.safetensors"]
    sigmas = sigma_schedule(3, gen["flow_shift"])
    assert sigmas.dtype == torch.float32
    assert sigmas.tolist() == gen["sigmas"] == [1.0, 0.8571428060531616, 0.5999999642372131, 0.0]
    assert timesteps_from_sigmas(sigmas).tolist() == gen["timesteps"]
    assert gen["timesteps"] == [1000.0, 857.142822265625, 599.9999389648438]


def test_distil_schedule_timesteps_and_r_match_golden_exactly(golden_distil):
    gen = _manifest(golden_distil)["files"]["gen.safetensors"]
    sched = FlowMatchSchedule.create(8, gen["flow_shift"])
    assert sched.num_steps == 8
    assert sched.sigmas.tolist() == gen["sigmas"]
    assert sched.timesteps.tolist() == gen["timesteps"]
    # r_i = t_{i+1}, 0 at the last step
    assert sched.timesteps_r.tolist() == gen["timesteps"][1:] + [0.0]
    calls = gen["model_calls"]
    assert len(calls) == 8
    for i, call in enumerate(calls):
        assert call["t"] == [float(sched.timesteps[i])]
        assert call["r"] == [float(sched.timesteps_r[i])]
        assert call["guidance"] == [guidance_value(gen["guidance_scale"])]


def test_schedule_shape_and_unshifted():
    s = sigma_schedule(5, 1.0)
    assert s.tolist() == torch.linspace(1, 0, 6).tolist()
    assert timesteps_r_from_sigmas(s).shape == (5,)
    with pytest.raises(ValueError):
        sigma_schedule(0)


# ---------------------------------------------------------------------------- guidance


def test_guidance_value_bf16_rounding(golden_distil):
    step = _manifest(golden_distil)["files"]["step.safetensors"]
    assert guidance_value(2.5) == 2496.0 == step["guidance_bf16"]
    assert guidance_value(1.0) == 1000.0


def test_cfg_combine_matches_golden_step(golden_tiny):
    t = load_file(str(golden_tiny / "image_step.safetensors"))
    pred = t["pred_cond_uncond"]
    out = cfg_combine(pred[0:1], pred[1:2], 3.5)
    torch.testing.assert_close(out, t["pred_cfg"], rtol=0, atol=1e-6)


def test_cfg_combine_only_above_one():
    cond = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cfg_combine(cond, None, 1.0), cond)
    assert torch.equal(cfg_combine(cond, torch.zeros_like(cond), 0.5), cond)
    with pytest.raises(ValueError):
        cfg_combine(cond, None, 2.0)
    assert uses_cfg_batch(2.5, cfg_distilled=False)
    assert not uses_cfg_batch(2.5, cfg_distilled=True)
    assert not uses_cfg_batch(1.0, cfg_distilled=False)


# ---------------------------------------------------------------------------- noise


def test_initial_noise_matches_golden_tiny(golden_tiny):
    t = load_file(str(golden_tiny / "image_gen.safetensors"))
    noise = initial_noise(42, (1, 16, 16, 16))
    assert noise.dtype == torch.float32
    assert torch.equal(noise, t["init_latents_bf16_as_f32"])


def test_initial_noise_matches_golden_distil_after_cond_posterior_draws(golden_distil):
    """With condition images the official code samples both VAE posteriors from the generator first."""
    t = load_file(str(golden_distil / "gen.safetensors"))
    gen = noise_generator(42)
    for lat in (t["cond0_vae_latents_sampled_scaled"], t["cond1_vae_latents_sampled_scaled"]):
        c, h, w = lat.shape
        torch.randn(1, c, 1, h, w, generator=gen)  # the posterior sample of one condition image
    assert torch.equal(initial_noise(gen, (1, 16, 16, 16)), t["init_latents_bf16_as_f32"])
    # a fresh generator alone does not give it: the draw order matters
    assert not torch.equal(initial_noise(42, (1, 16, 16, 16)), t["init_latents_bf16_as_f32"])


def test_initial_noise_is_per_seed_deterministic():
    a = initial_noise(7, (1, 4, 3, 5))
    assert torch.equal(a, initial_noise(7, [1, 4, 3, 5]))
    assert not torch.equal(a, initial_noise(8, (1, 4, 3, 5)))
    assert torch.equal(a, a.to(torch.bfloat16).float())  # bf16-valued


# ---------------------------------------------------------------------------- Euler replay


def _replay(init, preds, sigmas):
    x = init
    out = []
    for i in range(preds.shape[0]):
        x = euler_step(x, preds[i], float(sigmas[i]), float(sigmas[i + 1]))
        out.append(x)
    return out


def test_euler_replay_tiny_cfg(golden_tiny):
    t = load_file(str(golden_tiny / "image_gen.safetensors"))
    sigmas = sigma_schedule(3, 3.0)
    steps = _replay(t["init_latents_bf16_as_f32"], t["step_cfg_preds"], sigmas)
    for i, x in enumerate(steps):
        torch.testing.assert_close(x, t["step_latents"][i], rtol=0, atol=1e-6)
    torch.testing.assert_close(steps[-1], t["final_latents"], rtol=0, atol=1e-6)


def test_euler_replay_distil(golden_distil):
    t = load_file(str(golden_distil / "gen.safetensors"))
    sched = FlowMatchSchedule.create(8, 3.0)
    steps = _replay(t["init_latents_bf16_as_f32"], t["step_preds"], sched.sigmas)
    for i, x in enumerate(steps):
        torch.testing.assert_close(x, t["step_latents"][i], rtol=0, atol=1e-6)
    torch.testing.assert_close(steps[-1], t["final_latents"], rtol=0, atol=1e-6)


def test_euler_step_per_row_sigmas_equal_scalar_steps():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g)
    v = torch.randn(2, 4, 3, 3, generator=g)
    sched = FlowMatchSchedule.create(4, 3.0)
    s0, s1 = sched.sigma_pair(0), sched.sigma_pair(2)
    batched = euler_step(x, v, torch.tensor([s0[0], s1[0]]), torch.tensor([s0[1], s1[1]]))
    assert torch.equal(batched[0:1], euler_step(x[0:1], v[0:1], *s0))
    assert torch.equal(batched[1:2], euler_step(x[1:2], v[1:2], *s1))
    # the fp32 tensor and the Python-float forms of a sigma give the same step
    as_tensors = euler_step(x, v, sched.sigmas[1], sched.sigmas[2])
    assert torch.equal(as_tensors, euler_step(x, v, *sched.sigma_pair(1)))
