"""The decode loop's limits as served: the default prompt limit follows the device."""

from __future__ import annotations

import torch

from app.__main__ import build_parser
from app.serving.flags import CPU_MAX_PROMPT_TOKENS, engine_limits, for_device
from dpo_core.engine import EngineLimits


def test_without_a_prompt_limit_a_cpu_host_cuts_prompts_that_would_prefill_for_long():
    limits = engine_limits(build_parser().parse_args([]))
    assert limits.max_prompt_tokens is None  # not given
    cpu = for_device(limits, torch.device("cpu"))
    assert cpu.max_prompt_tokens == CPU_MAX_PROMPT_TOKENS
    assert for_device(limits, torch.device("cuda", 0)).max_prompt_tokens is None  # the context


def test_an_explicit_prompt_limit_is_kept_and_zero_means_the_context():
    for given in (0, 300, 8000):
        limits = engine_limits(build_parser().parse_args(["--max-prompt-tokens", str(given)]))
        assert for_device(limits, torch.device("cpu")).max_prompt_tokens == given
    assert for_device(EngineLimits(max_prompt_tokens=0), torch.device("cpu")).max_prompt_tokens == 0
