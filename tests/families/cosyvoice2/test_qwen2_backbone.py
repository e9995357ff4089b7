"""The Qwen2 backbone (cosyserve.nn.qwen2): config.json layouts, and the KV cache that batches
requests of different lengths (left padding, per-row positions): every row of a ragged batch
equals its solo run, through prefill, decode steps, cache growth, select and stack."""

from __future__ import annotations

import json

import pytest
import torch

from cosyserve.errors import ModelConfigError
from cosyserve.nn.conformer import KVCache
from cosyserve.nn.qwen2 import Qwen2Config, Qwen2Model, load_qwen2_config, qwen2_config_from_dict

pytestmark = pytest.mark.timeout(120)

ATOL = 2e-5  # float32 rounding between batched and solo matmuls

TINY = Qwen2Config(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=50,
    rope_theta=10000.0,
)

PUBLISHED_4X = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny networks: a second thread only adds synchronisation (costly on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> Qwen2Model:
    torch.manual_seed(7)
    net = Qwen2Model(TINY).eval()
    with torch.no_grad():  # norms away from 1 so that they matter
        for layer in net.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return net


# -- config.json -------------------------------------------------------------------------------


def test_config_transformers_4_layout() -> None:
    cfg = qwen2_config_from_dict(PUBLISHED_4X)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (896, 24, 14)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.kv_dim) == (2, 64, 128)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.vocab_size == 151936


def test_config_transformers_5_layout_means_the_same() -> None:
    raw = {k: v for k, v in PUBLISHED_4X.items() if k != "rope_theta"}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert qwen2_config_from_dict(raw) == qwen2_config_from_dict(PUBLISHED_4X)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_theta": None}, "rotary base"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "not supported"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"model_type": "llama"}, "not a Qwen2"),
        ({"hidden_size": "896"}, "hidden_size"),
    ],
)
def test_config_errors_are_clear(change: dict, message: str) -> None:
    raw = {**PUBLISHED_4X, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelConfigError, match=message):
        qwen2_config_from_dict(raw, "x/config.json")


def test_config_file_errors(tmp_path) -> None:
    with pytest.raises(ModelConfigError, match="missing"):
        load_qwen2_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelConfigError, match="not a readable JSON"):
        load_qwen2_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_4X), encoding="utf-8")
    assert load_qwen2_config(tmp_path).hidden_size == 896


# -- incremental decoding ----------------------------------------------------------------------


def _solo(model: Qwen2Model, prefix: torch.Tensor, steps: list[torch.Tensor]) -> torch.Tensor:
    """Outputs of one sequence: the prefix's last position, then one per decode step `[1+S, D]`."""
    cache = model.new_cache(1, 4)
    outs = [model.forward_chunk(prefix.unsqueeze(0), cache)[0, -1]]
    outs += [model.forward_chunk(x.reshape(1, 1, -1), cache)[0, -1] for x in steps]
    return torch.stack(outs)


@torch.inference_mode()
def test_incremental_equals_full_forward(model: Qwen2Model) -> None:
    torch.manual_seed(1)
    seq = torch.randn(1, 23, TINY.hidden_size)
    full = model(seq)[0]
    cache = model.new_cache(1, 2)  # tiny on purpose: grows by doubling several times
    parts = [model.forward_chunk(seq[:, :9], cache), model.forward_chunk(seq[:, 9:10], cache)]
    parts += [model.forward_chunk(seq[:, i : i + 1], cache) for i in range(10, 23)]
    assert cache.length == 23 and cache.capacity >= 23
    torch.testing.assert_close(torch.cat(parts, dim=1)[0], full, atol=ATOL, rtol=0)
    # A causal model: the outputs of a prefix do not depend on what follows.
    torch.testing.assert_close(model(seq[:, :9])[0], full[:9], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_positions_matter(model: Qwen2Model) -> None:
    """Rotary positions are real: the same two inputs in the other order give other outputs."""
    torch.manual_seed(2)
    a, b = torch.randn(2, 1, 1, TINY.hidden_size)
    ab = model(torch.cat([a, b], dim=1))[0, -1]
    ba = model(torch.cat([b, a], dim=1))[0, -1]
    assert (ab - ba).abs().max() > 1e-3


@torch.inference_mode()
def test_ragged_batch_rows_equal_their_solo_runs(model: Qwen2Model) -> None:
    torch.manual_seed(3)
    lengths = [7, 3, 12]
    n_steps = 6
    prefixes = [torch.randn(n, TINY.hidden_size) for n in lengths]
    steps = [[torch.randn(TINY.hidden_size) for _ in range(n_steps)] for _ in lengths]
    solo = [_solo(model, p, s) for p, s in zip(prefixes, steps)]

    longest = max(lengths)
    pad = [longest - n for n in lengths]
    batch = torch.stack([torch.nn.functional.pad(p, (0, 0, k, 0)) for p, k in zip(prefixes, pad)])
    cache = model.new_cache(len(lengths), 4, pad=pad)
    outs = [model.forward_chunk(batch, cache)[:, -1]]
    for i in range(n_steps):
        x = torch.stack([s[i] for s in steps]).unsqueeze(1)
        outs.append(model.forward_chunk(x, cache)[:, -1])
    batched = torch.stack(outs, dim=1)
    for row, expected in enumerate(solo):
        torch.testing.assert_close(batched[row], expected, atol=ATOL, rtol=0)
    assert torch.isfinite(batched).all()


@torch.inference_mode()
def test_stack_and_select_keep_every_row_equal_to_its_solo_run(model: Qwen2Model) -> None:
    """Requests join a running batch (stack, right-aligned) and leave it (select) mid-decode."""
    torch.manual_seed(4)
    d = TINY.hidden_size
    prefixes = [torch.randn(n, d) for n in (5, 9, 2)]
    steps = [[torch.randn(d) for _ in range(8)] for _ in prefixes]
    solo = [_solo(model, p, s) for p, s in zip(prefixes, steps)]

    # Row 0 alone for 3 steps.
    cache0 = model.new_cache(1, 4)
    got: list[list[torch.Tensor]] = [[model.forward_chunk(prefixes[0].unsqueeze(0), cache0)[0, -1]], [], []]
    for i in range(3):
        got[0].append(model.forward_chunk(steps[0][i].reshape(1, 1, d), cache0)[0, -1])
    # Rows 1 and 2 join with a left-padded prefill of their own, then everything is stacked.
    pad = [0, 7]
    joined = torch.stack([prefixes[1], torch.nn.functional.pad(prefixes[2], (0, 0, 7, 0))])
    cache12 = model.new_cache(2, 4, pad=pad)
    first = model.forward_chunk(joined, cache12)[:, -1]
    got[1].append(first[0])
    got[2].append(first[1])
    cache = KVCache.stack([cache0, cache12], extra_capacity=2)
    assert cache.batch_size == 3 and cache.pad is not None
    cursor = [3, 0, 0]
    for _ in range(3):
        x = torch.stack([steps[r][cursor[r]] for r in range(3)]).unsqueeze(1)
        out = model.forward_chunk(x, cache)[:, -1]
        for r in range(3):
            got[r].append(out[r])
            cursor[r] += 1
    # Row 1 leaves; rows 0 and 2 go on.
    cache = cache.select([0, 2])
    for _ in range(2):
        x = torch.stack([steps[r][cursor[r]] for r in (0, 2)]).unsqueeze(1)
        out = model.forward_chunk(x, cache)[:, -1]
        for i, r in enumerate((0, 2)):
            got[r].append(out[i])
            cursor[r] += 1
    for r in range(3):
        expected = solo[r][: len(got[r])]
        torch.testing.assert_close(torch.stack(got[r]), expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_fused_projections_give_the_same_outputs(model: Qwen2Model) -> None:
    torch.manual_seed(5)
    fused = Qwen2Model(TINY).eval()
    fused.load_state_dict(model.state_dict())
    for layer in fused.layers:
        layer.self_attn.fuse_projections()
        layer.mlp.fuse_projections()
        layer.mlp.fuse_projections()  # once: a second call changes nothing
    assert fused.layers[0].self_attn.qkv_proj is not None and fused.layers[0].mlp.gate_up_proj is not None
    seq = torch.randn(2, 11, TINY.hidden_size)
    torch.testing.assert_close(fused(seq), model(seq), atol=ATOL, rtol=0)
    cache_a, cache_b = model.new_cache(2, 4, pad=[0, 3]), fused.new_cache(2, 4, pad=[0, 3])
    torch.testing.assert_close(
        fused.forward_chunk(seq, cache_b), model.forward_chunk(seq, cache_a), atol=ATOL, rtol=0
    )
    x = torch.randn(2, 1, TINY.hidden_size)
    torch.testing.assert_close(
        fused.forward_chunk(x, cache_b), model.forward_chunk(x, cache_a), atol=ATOL, rtol=0
    )


def test_text_embedding_rows_keep_a_narrow_table(model: Qwen2Model) -> None:
    """A float16 table (as stored in llm.pt) is read row by row into the compute dtype."""
    net = Qwen2Model(TINY)
    net.embed_tokens.weight = torch.nn.Parameter(
        model.embed_tokens.weight.detach().half(), requires_grad=False
    )
    rows = net.embed([3, 0, 3])
    assert rows.dtype == torch.float32 and rows.shape == (3, TINY.hidden_size)
    torch.testing.assert_close(rows[0], rows[2])
    torch.testing.assert_close(rows[1], model.embed_tokens.weight[0].detach().half().float())
