"""Runtime plumbing that needs no GPU: graph-bucket specs, which captured graph a batch pads into,
and clear errors for a wrong artifact."""

import pytest
import torch

from triffusion.runtime import TorchRuntime, create_runtime, format_graph_shapes, parse_graph_shapes


def test_graph_shapes_round_trip_and_bad_spec_names_the_item():
    shapes = [(2, 64, 64), (16, 96, 96), (4,)]
    assert parse_graph_shapes(format_graph_shapes(shapes)) == shapes
    assert parse_graph_shapes("") == []
    with pytest.raises(ValueError, match="graph_shapes: '2xa' is not ROWSxHxW"):
        parse_graph_shapes("1x8x8,2xa")


def test_a_batch_pads_into_the_smallest_graph_with_room_and_the_same_resolution():
    runtime = TorchRuntime(torch.nn.Identity(), ["sample"], ["out"])
    key = lambda rows, h: ((rows, 4, h, h),)
    for rows in (2, 4, 8):
        for h in (64, 96):
            runtime.graphs[key(rows, h)] = f"{rows}@{h}"
    assert runtime.graph_for(key(4, 64)) == "4@64"  # exact
    assert runtime.graph_for(key(3, 64)) == "4@64"  # pads one row
    assert runtime.graph_for(key(5, 96)) == "8@96"
    assert runtime.graph_for(key(9, 64)) is None  # larger than any graph: eager
    assert runtime.graph_for(key(2, 80)) is None  # a resolution without graphs: eager


def test_torch_runtime_without_a_torch_artifact_says_how_to_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a torch artifact .* export with --runtime torch"):
        create_runtime("torch", tmp_path)
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'; choose one of: onnxruntime, torch"):
        create_runtime("tensorflow", tmp_path)
