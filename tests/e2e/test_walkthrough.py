"""The seed's scenario, scripted (scripts/walkthrough), with its numbers
asserted, and its pinned path (issue 14)."""

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

    # The pinned path: a lock, a bake with it, an overwrite in the bucket that no pinned pod serves.
    assert steps["lock v3"].requests == {"LIST": 1, "HEAD": 3} and steps["lock v3"].files_downloaded == []
    assert steps["bake with the lock"].files_downloaded == every and steps["bake with the lock"].by_version_id
    assert steps["bake with the lock"].requests == {"GET": 3}, "no listing: the lock is the listing"
    start = steps["pinned production start"]
    assert start.approved is True and start.requests == {}, "prebaked + lock: not a single request"
    lock_only = steps["lock-only pod"]
    assert lock_only.approved is True and lock_only.files_downloaded == every and lock_only.by_version_id
    assert "LIST" not in lock_only.requests and "HEAD" not in lock_only.requests
    assert steps["dynamic pod after the overwrite"].approved is False
    # v4: what the diff says the switch costs, what pre-staging downloads, and a switch that downloads nothing.
    assert steps["diff v3 -> v4"].files_downloaded == ["my-model/v4/model.safetensors"]
    assert steps["diff v3 -> v4"].bytes_downloaded == 2 * 1024 * 1024 and steps["diff v3 -> v4"].requests == {}
    stage = steps["pre-stage v4"]
    assert stage.files_downloaded == ["my-model/v4/model.safetensors"] and stage.bytes_downloaded == 2 * 1024 * 1024
    assert stage.approved is True, "the running v3 pod kept serving the approved bytes"
    assert steps["switch to v4"].requests == {} and steps["switch to v4"].files_downloaded == []
