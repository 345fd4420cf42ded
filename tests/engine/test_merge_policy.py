"""The auto-merge policy: merges a dominant adapter, unmerges on a uniform mix, and does not thrash near a threshold."""

import dataclasses
import itertools
import random

import pytest

from lora_server.engine.merging.policy import AutoMergePolicy, MergePolicyConfig

CONFIG = MergePolicyConfig(window_steps=20, merge_share=0.9, unmerge_share=0.6, min_steps_between_switches=40)


def run(policy: AutoMergePolicy, steps: list[dict], merged=None) -> tuple[object, list[tuple[int, str, object]]]:
    switches = []
    for step, tokens in enumerate(steps):
        policy.observe(tokens)
        decision = policy.decide(merged)
        if decision is not None:
            action, key = decision
            merged = key if action == "merge" else None
            policy.switched()
            switches.append((step, action, key))
    return merged, switches


def skewed(rng: random.Random, hot: str, share: float, n: int) -> list[dict]:
    steps = []
    for _ in range(n):
        hot_tokens = sum(rng.random() < share for _ in range(32))
        steps.append({hot: hot_tokens, f"cold-{rng.randrange(50)}": 32 - hot_tokens})
    return steps


def uniform(rng: random.Random, n: int) -> list[dict]:
    steps = []
    for _ in range(n):
        first, second = rng.sample(range(20), 2)
        steps.append({f"a{first}": 16, f"a{second}": 16})
    return steps


def test_merges_a_dominant_adapter_and_unmerges_on_a_uniform_mix(rng):
    policy = AutoMergePolicy(CONFIG)
    merged, switches = run(policy, skewed(rng, "hot", 0.97, 100))
    assert merged == "hot" and [s[1] for s in switches] == ["merge"]
    assert switches[0][0] == CONFIG.window_steps - 1, "it decides as soon as the window is full"
    merged, switches = run(policy, uniform(rng, 200), merged)
    assert merged is None and [s[1] for s in switches] == ["unmerge"]


def test_follows_a_new_dominant_adapter(rng):
    policy = AutoMergePolicy(CONFIG)
    merged, _ = run(policy, skewed(rng, "first", 0.97, 60))
    merged, switches = run(policy, skewed(rng, "second", 0.97, 100), merged)
    # The old one's share falls below unmerge_share before the new one's reaches merge_share: two switches.
    assert merged == "second" and [s[1:] for s in switches] == [("unmerge", None), ("merge", "second")]


def test_does_not_thrash_between_the_thresholds(rng):
    policy = AutoMergePolicy(CONFIG)
    merged, _ = run(policy, skewed(rng, "hot", 0.97, 60))
    # Shares wandering between 0.65 and 0.88: above unmerge, below merge. Nothing may change.
    steps = [s for _ in range(20) for s in skewed(rng, "hot", rng.uniform(0.7, 0.85), 10)]
    merged, switches = run(policy, steps, merged)
    assert merged == "hot" and switches == []


def test_switches_are_spaced_even_when_traffic_flips_often():
    # Runs of 25 steps of one adapter then 25 of another: each run fills the 20-step window, so every run would
    # merge its adapter at once if nothing held the policy back; min_steps_between_switches must space them.
    steps = [{"a": 32} if i % 50 < 25 else {"b": 32} for i in range(600)]
    _, unspaced = run(AutoMergePolicy(dataclasses.replace(CONFIG, min_steps_between_switches=0)), steps)
    assert min(b[0] - a[0] for a, b in itertools.pairwise(unspaced)) < CONFIG.min_steps_between_switches, \
        "the traffic must be able to switch faster than the spacing, or this test checks nothing"

    _, switches = run(AutoMergePolicy(CONFIG), steps)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(switches)]
    assert len(switches) >= 5, f"the flips should still drive switches: {switches}"
    assert min(gaps) >= CONFIG.min_steps_between_switches, gaps
    assert len(switches) < len(unspaced)


def test_config_refuses_inverted_thresholds():
    with pytest.raises(ValueError, match="unmerge_share"):
        MergePolicyConfig(merge_share=0.5, unmerge_share=0.7)
