"""Taylor cache: schedule, frequency split, extrapolation, per-request state, official parity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffgentor.engine.models.hunyuan_image_3.taylor_cache import (
    TaylorCache,
    TaylorCacheConfig,
    frequency_split,
    full_step_schedule,
)

FIRST = TaylorCacheConfig(enable_first_enhance=True)
TAIL = TaylorCacheConfig(enable_tailing_enhance=True)
BOTH = TaylorCacheConfig(enable_first_enhance=True, enable_tailing_enhance=True)

# Full steps written out from the official counter rule: the counter is reset by a full step, grows by one per
# skipped step, and a step is full when the counter already equals interval - 1 (so 4 skipped steps in between).
SCHEDULES = [
    (TaylorCacheConfig(), 8, [0, 5]),
    (FIRST, 8, [0, 1, 2, 7]),
    (TAIL, 8, [0, 5, 7]),
    (BOTH, 8, [0, 1, 2, 7]),
    (TaylorCacheConfig(), 50, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]),
    (FIRST, 50, [0, 1, 2, 7, 12, 17, 22, 27, 32, 37, 42, 47]),
    (TAIL, 50, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 49]),
    (BOTH, 50, [0, 1, 2, 7, 12, 17, 22, 27, 32, 37, 42, 47, 49]),
    (TaylorCacheConfig(enable_tailing_enhance=True, tailing_enhance_steps=3), 8, [0, 5, 6, 7]),
    (TaylorCacheConfig(enable_first_enhance=True, first_enhance_steps=6), 8, [0, 1, 2, 3, 4, 5]),
    (TaylorCacheConfig(interval=1), 8, list(range(8))),
    (TaylorCacheConfig(interval=2), 8, [0, 2, 4, 6]),
    (TaylorCacheConfig(interval=3, enable_first_enhance=True, first_enhance_steps=2), 8, [0, 1, 4, 7]),
]


@pytest.mark.parametrize(("config", "num_steps", "full_steps"), SCHEDULES)
def test_schedule(config, num_steps, full_steps):
    expected = [step in full_steps for step in range(num_steps)]
    assert full_step_schedule(config, num_steps) == expected
    cache = TaylorCache(config, num_steps)
    assert [cache.is_full_step(s) for s in range(num_steps)] == expected
    assert list(cache.schedule) == expected


def test_defaults_are_official_cli_defaults():
    cfg = TaylorCacheConfig()
    assert (cfg.interval, cfg.max_order, cfg.low_freqs_order, cfg.high_freqs_order) == (5, 2, 2, 2)
    assert (cfg.enable_first_enhance, cfg.first_enhance_steps) == (False, 3)
    assert (cfg.enable_tailing_enhance, cfg.tailing_enhance_steps) == (False, 1)
    assert (cfg.effective_low_order, cfg.effective_high_order) == (2, 2)
    with pytest.raises(ValueError):
        TaylorCacheConfig(interval=0)
    with pytest.raises(ValueError):
        TaylorCache(cfg, 0)


def test_effective_orders():
    assert TaylorCacheConfig(low_freqs_order=2, high_freqs_order=0).effective_low_order == 1
    assert TaylorCacheConfig(low_freqs_order=0, high_freqs_order=2).effective_low_order == 0
    assert TaylorCacheConfig(max_order=1).effective_low_order == 1
    assert TaylorCacheConfig(max_order=1).effective_high_order == 1
    assert TaylorCacheConfig(high_freqs_order=5).effective_high_order == 2


def _polynomial(coeffs: list[torch.Tensor]):
    return lambda step: sum(c * float(step) ** i for i, c in enumerate(coeffs))


def _run(cache: TaylorCache, trajectory, dtype=None) -> dict[int, torch.Tensor]:
    """Drive a cache over all steps; returns the predictions at skipped steps."""
    preds = {}
    for step in range(cache.num_steps):
        if cache.is_full_step(step):
            hidden = trajectory(step)
            cache.update(step, hidden if dtype is None else hidden.to(dtype))
        else:
            preds[step] = cache.predict(step)
    return preds


def _coeffs(degree: int, shape=(32, 16), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.1, 1e-3]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scales[i] for i in range(degree + 1)]


@pytest.mark.parametrize("degree", [0, 1])
@pytest.mark.parametrize("config", [TaylorCacheConfig(), FIRST, TaylorCacheConfig(max_order=1)])
def test_prediction_exact_for_constant_and_linear(degree, config):
    traj = _polynomial(_coeffs(degree))
    cache = TaylorCache(config, 50)
    preds = _run(cache, traj)
    fed = 0
    for step in range(50):
        if cache.is_full_step(step):
            fed += 1 if not (config.enable_first_enhance and step < config.first_enhance_steps - 1) else 0
            continue
        if fed > degree:  # a slope needs two stored full steps
            torch.testing.assert_close(preds[step], traj(step), atol=1e-4, rtol=0)


def test_prediction_quadratic_is_official_backward_difference_taylor():
    """D2 is exact for a quadratic, but D1 is the mid-interval slope, so a c*s^2 term leaves c*delta*d error."""
    a, b, c = _coeffs(2)
    traj = _polynomial([a, b, c])
    cache = TaylorCache(TaylorCacheConfig(), 50)
    preds = _run(cache, traj)
    for step, pred in preds.items():
        last = (step // 5) * 5
        d = step - last
        if last == 0:
            expected = traj(0)
        elif last == 5:
            expected = traj(5) + (b + c * 5) * d  # D1 only: (X5 - X0) / 5
        else:
            slope = b + c * (2 * last - 5)
            expected = traj(last) + slope * d + c * d**2
            torch.testing.assert_close(pred - traj(step), -c * 5 * d, atol=1e-4, rtol=0)
        torch.testing.assert_close(pred, expected, atol=1e-4, rtol=0)


def test_frequency_split_reconstructs_and_separates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 8, generator=g)
    low, high = frequency_split(x)
    assert low.shape == high.shape == x.shape and low.dtype == x.dtype
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)
    # n = 64: |f| = k/64 <= 0.1 * 0.5 keeps k <= 3 in the low part
    t = torch.arange(64, dtype=torch.float32)[:, None].expand(64, 8)
    slow, fast = torch.cos(2 * math.pi * 3 * t / 64), torch.cos(2 * math.pi * 4 * t / 64)
    lo, hi = frequency_split(slow)
    torch.testing.assert_close(lo, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(hi, torch.zeros_like(slow), atol=1e-5, rtol=0)
    lo, hi = frequency_split(fast)
    torch.testing.assert_close(lo, torch.zeros_like(fast), atol=1e-5, rtol=0)
    torch.testing.assert_close(hi, fast, atol=1e-5, rtol=0)
    # bf16 in, bf16 out (FFT itself in fp32)
    lo, hi = frequency_split(x.bfloat16())
    assert lo.dtype == hi.dtype == torch.bfloat16
    torch.testing.assert_close((lo.float() + hi.float()), x, atol=5e-2, rtol=0)


def test_unequal_orders_use_the_split():
    """With unequal part orders the prediction is not the unsplit one: the high part is held constant."""
    traj = _polynomial(_coeffs(1, shape=(64, 4), seed=3))
    split = _run(TaylorCache(TaylorCacheConfig(high_freqs_order=0, low_freqs_order=1), 20), traj)
    plain = _run(TaylorCache(TaylorCacheConfig(max_order=1), 20), traj)
    # D1 exists from step 6 on: low part extrapolated, high part frozen at the last full step
    x5 = traj(5)
    _, high5 = frequency_split(x5)
    low7, _ = frequency_split(traj(7))
    torch.testing.assert_close(split[7], low7 + high5, atol=1e-5, rtol=0)
    assert not torch.allclose(split[7], plain[7], atol=1e-5)


def test_requests_are_independent():
    traj_a = _polynomial(_coeffs(2, seed=10))
    traj_b = _polynomial(_coeffs(2, seed=11))
    solo_a = _run(TaylorCache(TaylorCacheConfig(), 20), traj_a)
    solo_b = _run(TaylorCache(FIRST, 20), traj_b)
    a, b = TaylorCache(TaylorCacheConfig(), 20), TaylorCache(FIRST, 20)
    preds_a, preds_b = {}, {}
    for step in range(20):  # interleaved, as in a batch
        for cache, traj, preds in ((a, traj_a, preds_a), (b, traj_b, preds_b)):
            if cache.is_full_step(step):
                cache.update(step, traj(step))
            else:
                preds[step] = cache.predict(step)
    assert preds_a.keys() == solo_a.keys() and preds_b.keys() == solo_b.keys()
    for step in preds_a:
        assert torch.equal(preds_a[step], solo_a[step])
    for step in preds_b:
        assert torch.equal(preds_b[step], solo_b[step])


def test_reset_clears_state():
    traj = _polynomial(_coeffs(1))
    cache = TaylorCache(TaylorCacheConfig(), 12)
    first = _run(cache, lambda s: traj(s))
    cache2 = TaylorCache(TaylorCacheConfig(), 12)
    cache2.update(0, traj(0))
    cache2.update(5, traj(5))
    assert cache2.orders == (2, 2) and cache2.nbytes > 0 and cache2.last_full_step == 5
    cache2.reset()
    assert cache2.orders == (0, 0) and cache2.nbytes == 0 and cache2.last_full_step is None
    with pytest.raises(RuntimeError):
        cache2.predict(6)
    again = _run(cache2, traj)
    assert first.keys() == again.keys()
    for step in first:
        assert torch.equal(first[step], again[step])


def test_tables_released_after_last_step():
    traj = _polynomial(_coeffs(1))
    cache = TaylorCache(TAIL, 8)
    _run(cache, traj)
    assert cache.nbytes == 0
    cache = TaylorCache(TaylorCacheConfig(), 8)  # step 7 is skipped: released after its prediction
    preds = _run(cache, traj)
    assert 7 in preds and cache.nbytes == 0


def test_first_enhance_stores_only_from_window_end():
    traj = _polynomial(_coeffs(1))
    cache = TaylorCache(FIRST, 10)
    cache.update(0, traj(0))
    cache.update(1, traj(1))
    assert cache.orders == (0, 0)
    cache.update(2, traj(2))
    assert cache.orders == (1, 1)
    torch.testing.assert_close(cache.predict(3), traj(2), atol=1e-5, rtol=0)


def test_misuse_raises():
    x = torch.randn(16, 8)
    cache = TaylorCache(TaylorCacheConfig(), 10)
    with pytest.raises(ValueError):
        cache.update(1, x)  # skipped step
    with pytest.raises(ValueError):
        cache.predict(0)  # full step
    with pytest.raises(RuntimeError):
        cache.predict(1)  # nothing stored
    with pytest.raises(ValueError):
        cache.is_full_step(10)
    cache.update(0, x)
    with pytest.raises(ValueError):
        cache.update(5, torch.randn(17, 8))  # shape change
    with pytest.raises(RuntimeError):
        cache.predict(6)  # step 5 was never fed
    cache.update(5, x)
    with pytest.raises(ValueError):
        cache.update(5, x)  # same step twice


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official cache_utils.py: its predictions for these configs and trajectories were recorded once
# (tests/fixtures/make_taylor_cache_official.py, run against the official file) into FIXTURE, bit for bit.

FIXTURE = Path(__file__).parent / "fixtures" / "taylor_cache_official.safetensors"

PARITY_CONFIGS = [
    TaylorCacheConfig(),
    FIRST,
    TAIL,
    BOTH,
    TaylorCacheConfig(interval=3, max_order=1, low_freqs_order=1, high_freqs_order=1),
    TaylorCacheConfig(low_freqs_order=0, high_freqs_order=2),  # cache_init's own defaults
    TaylorCacheConfig(low_freqs_order=2, high_freqs_order=0),  # low part capped at high + 1
    TaylorCacheConfig(low_freqs_order=2, high_freqs_order=1),
    TaylorCacheConfig(low_freqs_order=3, high_freqs_order=3),  # max_order + 1: capped at max_order
    TaylorCacheConfig(
        interval=4,
        enable_first_enhance=True,
        first_enhance_steps=5,
        enable_tailing_enhance=True,
        tailing_enhance_steps=2,
    ),
]
PARITY_CASES = [(i, n, dtype) for i in range(len(PARITY_CONFIGS)) for n in (8, 50)
                for dtype in (torch.float32, torch.bfloat16)]


def parity_key(config_index: int, num_steps: int, dtype: torch.dtype) -> str:
    return f"config{config_index}/steps{num_steps}/{str(dtype).removeprefix('torch.')}"


def parity_trajectory(config: TaylorCacheConfig, num_steps: int, dtype: torch.dtype):
    """A smooth hidden-state path plus a little noise: [cfg row, tokens, dim] per step."""
    g = torch.Generator().manual_seed(num_steps + config.interval)
    base = torch.randn(5, 2, 12, 4, generator=g)  # [coefficient, cfg row, tokens, dim]
    noise = torch.randn(num_steps, 2, 12, 4, generator=g)

    def trajectory(step):
        s = step / num_steps
        return (base[0] + base[1] * s + base[2] * s * s + base[3] * math.sin(3 * s) + 0.01 * noise[step]).to(dtype)

    return trajectory


@pytest.fixture(scope="module")
def official():
    return load_file(str(FIXTURE))


def save_parity_predictions(path: str) -> None:
    """Our predictions for every parity case, saved like FIXTURE (run by `ours` in a child process)."""
    from safetensors.torch import save_file

    out = {}
    for config_index, num_steps, dtype in PARITY_CASES:
        key = parity_key(config_index, num_steps, dtype)
        cache = TaylorCache(PARITY_CONFIGS[config_index], num_steps)
        preds = _run(cache, parity_trajectory(PARITY_CONFIGS[config_index], num_steps, dtype))
        for step, pred in preds.items():
            out[f"{key}/{step}"] = pred.contiguous()
    save_file(out, path)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our predictions computed in a child process with MKL's code path fixed (MKL_CBWR=COMPATIBLE): the low/high
    frequency split is an FFT, and MKL picks its kernels by CPU (AVX-512 machines round differently from the AVX2
    machine the official outputs were recorded on, by up to 1.4e-6 in fp32 and 3 bf16 ulps). MKL reads the
    setting once, at start-up, hence the child process; the comparison stays bit for bit."""
    import os
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("taylor") / "ours.safetensors"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_taylor_cache as t; "
            f"t.save_parity_predictions({str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MKL_CBWR": "COMPATIBLE"},
                   timeout=300)
    return load_file(str(path))


def test_the_fixture_covers_every_case(official):
    keys = {k.rpartition("/")[0] for k in official}
    assert keys == {parity_key(*case) for case in PARITY_CASES}


@pytest.mark.parametrize(("config_index", "num_steps", "dtype"), PARITY_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_matches_official(official, ours, config_index, num_steps, dtype):
    config, key = PARITY_CONFIGS[config_index], parity_key(config_index, num_steps, dtype)
    ref_schedule = official[f"{key}/schedule"].bool().tolist()
    ref_steps = official[f"{key}/pred_steps"].tolist()
    ref_preds = official[f"{key}/preds"]
    cache = TaylorCache(config, num_steps)
    assert list(cache.schedule) == ref_schedule
    preds = {int(k.rpartition("/")[2]): v for k, v in ours.items() if k.rpartition("/")[0] == key}
    assert sorted(preds) == ref_steps
    for i, step in enumerate(ref_steps):
        assert preds[step].dtype == ref_preds.dtype == dtype
        torch.testing.assert_close(preds[step], ref_preds[i], atol=0, rtol=0)
