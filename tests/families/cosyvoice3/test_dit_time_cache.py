"""The DiT's time conditioning (every block's adaptive-norm vectors) is computed once per time value
on CPU and reused: the same outputs as computing it at every call, never stale after new weights."""

from __future__ import annotations

import torch

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
