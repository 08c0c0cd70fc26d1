"""Redundancy analysis for users: numbers that mean what they say, and files that get written."""

import json

import torch
from conftest import collate, make_dataset, tiny_llava

from hf_sparse_mllm.skipping import bypass_layers
from hf_sparse_mllm.skipping.analysis import analyze_redundancy


def test_identity_layer_reads_as_fully_redundant(tmp_path):
    model, processor = tiny_llava(num_hidden_layers=4)
    batch = collate(processor, make_dataset(3))
    layers = model.model.language_model.layers
    with bypass_layers(layers, [2]):  # layer 2 passes its input through: similarity exactly 1
        report = analyze_redundancy(model, [batch])
    assert len(report.layer_similarity) == 4
    assert report.layer_similarity[2] == 1.0
    assert all(s < 0.9999 for i, s in enumerate(report.layer_similarity) if i != 2)
    assert report.num_images == 3 and report.grid_size == (4, 4) and len(report.visual_token_redundancy) == 16


def test_flat_images_have_redundant_tokens_and_files_are_written(tmp_path):
    model, processor = tiny_llava()
    report = analyze_redundancy(model, [collate(processor, make_dataset(2))])
    # make_dataset draws single-colour images: every patch looks like its neighbours
    assert min(report.visual_token_redundancy) > 0.99
    paths = report.save(tmp_path)
    assert sorted(p.name for p in paths) == ["redundancy.json", "redundancy.md", "redundancy.png"]
    assert json.loads((tmp_path / "redundancy.json").read_text())["layer_similarity"] == report.layer_similarity
    assert (tmp_path / "redundancy.png").stat().st_size > 1000
    assert "| 0 |" in (tmp_path / "redundancy.md").read_text()
    assert model.training is False and torch.is_grad_enabled()
