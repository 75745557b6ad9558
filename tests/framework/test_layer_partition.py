"""layer_partition: the distribution rule, its documented examples, and its asserts."""

import pytest

from pithtrain.dualpipe.layer_partition import layer_partition


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "expected"),
    [
        (27, 8, [3, 4, 4, 4, 3, 3, 3, 3]),
        (3, 2, [2, 1]),
        (5, 3, [2, 2, 1]),
        (8, 4, [2, 2, 2, 2]),
        (6, 4, [1, 2, 2, 1]),
        (4, 1, [4]),
        (7, 7, [1] * 7),
    ],
)
def test_protocol_examples(num_layers, num_stages, expected):
    assert layer_partition(num_layers, num_stages) == expected


def test_remainder_goes_to_inner_stages_first():
    # 10 over 4: base 2, two extra layers, both inner stages get one, edges stay light.
    assert layer_partition(10, 4) == [2, 3, 3, 2]
    # 11 over 4: inner stages are full, the third extra goes to the first edge.
    assert layer_partition(11, 4) == [3, 3, 3, 2]


@pytest.mark.parametrize("num_layers", range(8, 40))
@pytest.mark.parametrize("num_stages", [2, 4, 6, 8])
def test_invariants(num_layers, num_stages):
    counts = layer_partition(num_layers, num_stages)
    assert sum(counts) == num_layers
    assert max(counts) - min(counts) <= 1
    # A pp rank's two stages (k and S-1-k) differ by one layer at most.
    for k in range(num_stages // 2):
        assert abs(counts[k] - counts[num_stages - 1 - k]) <= 1


@pytest.mark.parametrize(("num_layers", "num_stages"), [(3, 4), (0, 1), (5, 0)])
def test_rejects_too_few_layers_or_stages(num_layers, num_stages):
    with pytest.raises(AssertionError):
        layer_partition(num_layers, num_stages)
