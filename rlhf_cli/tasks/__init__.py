"""Synthetic verifiable tasks: seeded prompts with a programmatic gold reward, for testing that RL stages learn.

A task module exposes `gold_reward(prompts, responses) -> list[float]`, which users name as `module:function`
(e.g. `rlhf_cli.tasks.word_order:gold_reward`). Task modules import only the standard library, so the data
scripts that share their tables stay light.
"""
