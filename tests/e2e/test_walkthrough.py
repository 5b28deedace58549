"""The seed's scenario, scripted (scripts/walkthrough), with its numbers asserted."""

from __future__ import annotations

import pytest
import walkthrough

pytestmark = pytest.mark.fuse


def test_seed_scenario_downloads_only_what_each_step_needs(fuse_ok: None) -> None:
    steps = {s.name: s for s in walkthrough.run(model_mib=2, quiet=True)}
    every = ["my-model/v3/config.json", "my-model/v3/model.safetensors", "my-model/v3/tokenizer.json"]
    assert steps["test deployment"].files_downloaded == every
    assert steps["bake"].files_downloaded == every
    assert steps["production start"].files_downloaded == []
    assert steps["production start"].bytes_downloaded == 0
    assert steps["bake new version"].files_downloaded == ["my-model/v4/model.safetensors"]
    assert steps["production pod switched to the new version"].files_downloaded == ["my-model/v4/model.safetensors"]
    assert steps["bake new version"].bytes_downloaded == 2 * 1024 * 1024
