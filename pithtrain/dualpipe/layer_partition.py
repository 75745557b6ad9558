"""How many decoder layers each pipeline stage owns."""

from typing import List


def layer_partition(num_layers: int, num_stages: int) -> List[int]:
    """Per-stage layer counts for ``num_layers`` layers over ``num_stages`` stages.

    Every stage starts with ``num_layers // num_stages``. The remainder is handed out one
    layer at a time to a stage with the smallest count, preferring the lowest-index inner
    stage (1..S-2); an edge stage gets one only when no inner stage holds the minimum,
    because the edge stages also carry the embedding or the head.

    >>> layer_partition(27, 8)
    [3, 4, 4, 4, 3, 3, 3, 3]
    >>> layer_partition(5, 3)
    [2, 2, 1]
    """
    assert num_layers >= num_stages >= 1, f"need {num_layers=} >= {num_stages=} >= 1"
    base, remainder = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    inner = range(1, num_stages - 1)
    for _ in range(remainder):
        smallest = min(counts)
        candidates = [s for s in inner if counts[s] == smallest]
        if not candidates:
            candidates = [s for s in range(num_stages) if counts[s] == smallest]
        counts[candidates[0]] += 1
    assert sum(counts) == num_layers
    if num_stages % 2 == 0:
        # A pp rank holds stages k and S-1-k; the overlapped loop pairs their layers and
        # tolerates a difference of one at most.
        for k in range(num_stages // 2):
            other = num_stages - 1 - k
            assert abs(counts[k] - counts[other]) <= 1, (
                f"stages {k} and {other} share a pp rank but hold {counts[k]} and "
                f"{counts[other]} layers (partition {counts})"
            )
    return counts
