"""Evaluation in lmms-eval's shape: batched greedy generation, benchmark metrics, tasks and results files."""

from .generation import generate_answers, generate_from_prompts

__all__ = ["generate_answers", "generate_from_prompts"]
