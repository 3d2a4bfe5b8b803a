"""The bench's `--orthanc` settings go to the Orthancs that run the plugin, not to the baseline."""

from __future__ import annotations

from bench.scenarios import with_orthanc_settings

THREADS = {"Python": {"AllowThreads": True}}


def test_an_orthanc_with_the_plugin_gets_the_settings_under_test() -> None:
    arguments = with_orthanc_settings({"kheops": {"Url": "http://kheops"}}, THREADS)

    assert arguments["extra_config"] == THREADS


def test_a_plain_orthanc_keeps_its_own_configuration() -> None:
    arguments = with_orthanc_settings({"load_dicomweb": True}, THREADS)

    assert "extra_config" not in arguments


def test_a_scenarios_own_extra_settings_are_merged_and_win() -> None:
    arguments = with_orthanc_settings(
        {
            "kheops": {},
            "extra_config": {"MaximumStorageCacheSize": 0, "Python": {"Verbose": True}},
        },
        {"Python": {"AllowThreads": True}, "MaximumStorageCacheSize": 128},
    )

    assert arguments["extra_config"] == {
        "MaximumStorageCacheSize": 0,
        "Python": {"AllowThreads": True, "Verbose": True},
    }
