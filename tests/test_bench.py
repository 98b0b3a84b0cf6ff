"""lstmkit bench's timing: the order of the contenders changes from round to round."""
from collections import Counter

from lstmkit.cli.bench import compare, round_orders


def test_round_orders_put_each_contender_in_each_place_and_after_each_other():
    names = ["ours", "torch", "ort"]
    orders = round_orders(names, 12)
    assert all(sorted(o) == sorted(names) for o in orders)
    for place in range(3):  # twelve rounds of three: each name four times in each place
        assert Counter(o[place] for o in orders) == {n: 4 for n in names}
    sequence = [n for o in orders for n in o]  # who runs right before whom, across rounds too
    follows = Counter(zip(sequence, sequence[1:]))
    assert all(follows[(a, b)] > 0 for a in names for b in names if a != b)
    for n in range(2, 9):  # a whole design: each place and each neighbour pair equally often
        many = [f"f{k}" for k in range(n)]
        orders = round_orders(many, n if n % 2 == 0 else 2 * n)
        assert all(sorted(o) == sorted(many) for o in orders)
        for place in range(n):
            assert len(set(Counter(o[place] for o in orders).values())) == 1
        pairs = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
        assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1
    first = Counter(o[0] for o in round_orders(["a", "b", "c", "d"], 8))
    assert first == {n: 2 for n in "abcd"}  # every permutation in turn put "a" first 6 times of 8


def test_compare_times_every_function_every_round():
    calls = Counter()
    fns = {name: (lambda name=name: calls.update([name])) for name in ("a", "b", "c")}
    t = compare(fns, min_time=0.0, rounds=5)
    assert set(t) == {"a", "b", "c"} and all(v >= 0 for v in t.values())
    assert len(set(calls.values())) == 1 and calls["a"] >= 3 + 5  # warm-ups, then one call a round at least
