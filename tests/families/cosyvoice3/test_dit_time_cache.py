"""The DiT's time conditioning (every block's adaptive-norm vectors) is computed once per time value
on CPU and reused: the same outputs as computing it at every call, never stale after new weights;
CPU plans precompute it for the sampler's step times and free its weights."""

from __future__ import annotations

import pytest
import torch

from cosyserve.nn.cfm import euler_cfg, euler_times
from cosyserve.nn.dit import DiT, DiTConfig

CFG = DiTConfig(dim=32, depth=2, heads=2, dim_head=16, ff_mult=2, mel_dim=8, mu_dim=8, spk_dim=8)


def _inputs(t: float, frames: int = 7) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(2, 8, frames, generator=gen) for _ in range(3))
    return x, torch.ones(2, 1, frames), mu, torch.full((2,), t), torch.randn(2, 8, generator=gen), cond


def _uncached(dit: DiT, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.enable_grad():  # the cache is for inference only
        return dit(*args).detach()


def test_time_conditioning_is_computed_once_per_time_value() -> None:
    torch.manual_seed(1)
    dit = DiT(CFG).eval()
    calls: list[int] = []
    dit.time_embed.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    args = _inputs(0.3)
    with torch.inference_mode():
        first, again = dit(*args), dit(*args)
    assert calls == [1] and len(dit._time_cache) == 1  # one row computed, reused for the CFG pair
    assert torch.equal(first, again)
    torch.testing.assert_close(first, _uncached(dit, args), atol=1e-6, rtol=0)
    with torch.inference_mode():
        dit(*_inputs(0.7))
        mixed = list(_inputs(0.3))
        mixed[3] = torch.tensor([0.3, 0.7])  # rows at different times: computed per call, not cached
        out = dit(*mixed)
    assert len(dit._time_cache) == 2
    torch.testing.assert_close(out, _uncached(dit, tuple(mixed)), atol=1e-6, rtol=0)


def test_new_weights_are_never_served_stale_conditioning() -> None:
    torch.manual_seed(2)
    dit, other = DiT(CFG).eval(), DiT(CFG).eval()
    args = _inputs(0.5)
    with torch.inference_mode():
        dit(*args)
    dit.load_state_dict(other.state_dict())  # in place: the same tensors, new values
    with torch.inference_mode():
        torch.testing.assert_close(dit(*args), other(*args), atol=1e-6, rtol=0)
        dit.double()  # new tensors: another key
        out = dit(*(a.double() for a in args))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), _uncached(other, args), atol=1e-5, rtol=0)


def test_frozen_time_conditioning_serves_the_sampler_times_without_its_weights() -> None:
    """A plan precomputes the conditioning of the sampler's own step times and frees the weights it
    comes from: the same outputs for those times (rows at one time or at several), every freed
    parameter on the meta device, and a clear error for any other time or a new checkpoint."""
    torch.manual_seed(3)
    dit = DiT(CFG).eval()
    times = euler_times(10)
    mixed = list(_inputs(0.0))
    mixed[3] = times[[2, 7]]
    with torch.inference_mode():
        before = [dit(*_inputs(float(t))) for t in times]
        before_mixed = dit(*mixed)
    time_params = [p for m in dit._time_modules() for p in m.parameters()]
    size = sum(p.numel() * p.element_size() for p in time_params)
    kept = sum(p.numel() for p in dit.parameters()) - sum(p.numel() for p in time_params)

    assert dit.freeze_time_conditioning(times) == size > 0
    assert all(p.is_meta for m in dit._time_modules() for p in m.parameters())
    assert sum(p.numel() for p in dit.parameters() if not p.is_meta) == kept
    torch.testing.assert_close(dit.frozen_times, times, rtol=0, atol=0)
    with torch.inference_mode():
        for t, ref in zip(times, before):
            assert torch.equal(dit(*_inputs(float(t))), ref)
        torch.testing.assert_close(dit(*mixed), before_mixed, atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="not one of the 10 Euler step times"):
            dit(*_inputs(0.5))
        other_dtype = list(_inputs(0.0))
        other_dtype[3] = times[:2].double()
        with pytest.raises(RuntimeError, match="float32 t"):
            dit(*other_dtype)
    with pytest.raises(RuntimeError, match="fresh model"):
        dit.load_state_dict(DiT(CFG).state_dict())
    assert dit.freeze_time_conditioning(times) == 0  # once


def test_euler_times_are_the_times_the_sampler_calls_the_estimator_with() -> None:
    seen: list[float] = []

    def estimator(x, mask, mu, t, spks, cond):  # noqa: ANN001, ANN202 - the sampler's callback
        seen.extend(t.tolist())
        return torch.zeros_like(x)

    z = torch.zeros(1, 8, 5)
    euler_cfg(estimator, z, z, torch.ones(1, 1, 5), torch.zeros(1, 8), z, 10, 0.7)
    assert seen == [t for t in euler_times(10).tolist() for _ in range(2)]  # the CFG pair: one t
