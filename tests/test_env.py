"""Environment switches parsed one way (benchmarks.core.env)."""

from benchmarks.core.env import env_flag, offline_switches


def test_env_flag_accepts_the_hubs_spellings_of_on_and_nothing_else():
    for value in ("1", "on", "YES", " True "):
        assert env_flag("X", {"X": value}), value
    for value in ("0", "", "false", "off", "no", "2"):
        assert not env_flag("X", {"X": value}), value
    assert not env_flag("X", {})


def test_offline_switches_lists_the_variables_that_are_on_in_order():
    assert offline_switches({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "on"}) == ["HF_HUB_OFFLINE",
                                                                                       "HF_DATASETS_OFFLINE"]
    assert offline_switches({"HF_HUB_OFFLINE": "0"}) == []
