"""The bench's own arithmetic (bench/rollout.py, bench/gpu_check.py), on CPU: what gpu.sh's numbers rest on."""
import torch

from bench.gpu_check import chi_square_p
from bench.rollout import op_counts, steady_probs
from conftest import make_model


def test_chi_square_passes_chance_and_fails_a_real_difference():
    """Two samples of 4000 draws from one peaked distribution over 50 tokens pass (p >= 1e-3) for each of 5 seeds;
    the same at temperature 1.25 against 1 fails (p < 1e-3)."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 2  # (50,)
    draw = lambda T, g: torch.multinomial((logits / T).softmax(-1), 4000, replacement=True, generator=g)  # noqa
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert chi_square_p(draw(1.0, g), draw(1.0, g))[0] >= 1e-3
        assert chi_square_p(draw(1.25, g), draw(1.0, g))[0] < 1e-3


def test_steady_lengths_are_uniform_in_half_to_three_halves_of_the_mean():
    p = steady_probs(8, 32)  # lengths 1..32
    assert torch.isclose(p.sum(), torch.tensor(1.0))
    assert p.nonzero().flatten().add(1).tolist() == list(range(4, 13))


def test_op_counts_per_layer_do_not_depend_on_depth(tokenizer):
    """The aten ops of one eager decode step split into layers x per layer + the rest: a 2-layer and a 3-layer model of
    one width give the same ops per layer and outside the layers (so the split attributes every op once)."""
    two, three = (op_counts(make_model(tokenizer, num_hidden_layers=n).eval()) for n in (2, 3))
    assert two["decode_forwards_seen"] == three["decode_forwards_seen"] == 16
    assert two["per_layer_nonview"] == three["per_layer_nonview"] > 0
    assert two["outside_layers_nonview"] == three["outside_layers_nonview"] > 0
    assert three["per_step_nonview"] - two["per_step_nonview"] == two["per_layer_nonview"]
    assert two["per_step_syncs"] == 0  # the decode step reads nothing back from the device
