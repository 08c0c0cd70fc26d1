"""Render `model_cards/example.md`, an example of the card `SparseMLLMTrainer` writes: `python model_cards/render_example.py`.

The template itself ships inside the package (`hf_sparse_mllm/templates/model_card.md`). The numbers below are
illustrative placeholders, not measurements.
"""

from pathlib import Path

from huggingface_hub import EvalResult

from hf_sparse_mllm import SparseMLLMConfig
from hf_sparse_mllm.hub import render_model_card


def example_card():
    recipe = SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.1, slow_mode_prob=0.1, stage="instruction")
    return render_model_card(
        recipe,
        model_name="llava-1.5-7b-sparse-example",
        repo_id="your-name/llava-1.5-7b-sparse-example",
        model_type="llava",
        base_model="llava-hf/llava-1.5-7b-hf",
        datasets=["liuhaotian/LLaVA-Instruct-150K"],
        samples_per_second=2.0,
        baseline_samples_per_second=1.0,
        eval_results=[
            EvalResult(
                task_type="visual-question-answering",
                dataset_type="lmms-lab/GQA",
                dataset_name="GQA (placeholder value)",
                dataset_split="testdev_balanced_instructions",
                metric_type="exact_match",
                metric_value=0.5,
            )
        ],
        license="apache-2.0",
        language="en",
    )


if __name__ == "__main__":
    out = Path(__file__).with_name("example.md")
    out.write_text(str(example_card()))
    print(f"wrote {out}")
