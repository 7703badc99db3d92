import torch

from meswitch.compress.allocate import allocate, describe, nbytes


def test_budget_respected_and_spent_where_error_is():
    g = torch.Generator().manual_seed(0)
    # two matrices: one whose outputs matter a lot (large activations), one that barely matters
    deltas = {"hot": torch.randn(64, 128, generator=g), "cold": torch.randn(64, 128, generator=g)}
    act = {"hot": torch.full((128,), 100.0), "cold": torch.full((128,), 0.01)}
    choice = allocate({n: (lambda d=d: d) for n, d in deltas.items()}, act, target_bits=1.8)
    params = sum(d.numel() for d in deltas.values())
    assert 8 * sum(nbytes(f) for f, _ in choice.values()) / params <= 1.8
    assert choice["hot"][1]["rung"] != "sign2d" and choice["cold"][1]["rung"] == "sign2d"
    assert describe(choice) == {"sign2d": 1, choice["hot"][1]["rung"]: 1}


def test_generous_budget_upgrades_everything_and_tight_one_is_refused():
    d = {"a": torch.randn(32, 64), "b": torch.randn(32, 64)}
    getters = {n: (lambda t=t: t) for n, t in d.items()}
    choice = allocate(getters, {}, target_bits=8)
    assert {m["rung"] for _, m in choice.values()} == {"rtn3"}
    try:
        allocate(getters, {}, target_bits=0.5)
    except ValueError as exc:
        assert "below the cheapest" in str(exc)
    else:
        raise AssertionError("a budget below 1 bit must be refused")
