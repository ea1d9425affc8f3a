"""Verifiers for tests/test_dataset_env.py, loaded by name (env.reward=dataset_rewards:...) the
way a user's own reward module is."""


def half(response: str, label: str) -> float:
    return 0.5


def mentions_label(response: str, label: str):
    return (1.0 if label in response else 0.0), {"checked": "substring", "objects": {1, 2}, "big": 2**70}


def forged(response: str, label: str) -> float:
    return float(response.count("9")) * 100.0  # out of range as soon as a 9 appears


def broken(response: str, label: str) -> float:
    raise RuntimeError("verifier bug")


NOT_A_FUNCTION = 3


def structured(response: str, label, extra):
    """verl-style: the label may be an object; the record's extra fields come third."""
    kind = type(label).__name__
    right = str(label["sum"]) if isinstance(label, dict) else label
    return (1.0 if response.strip() == right else 0.0), {"seen": f"{kind}/{extra.get('source')}/{extra.get('level')}"}

