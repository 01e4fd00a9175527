"""Runtime plumbing that needs no GPU: graph-bucket specs, which captured graph a batch pads into,
and clear errors for a wrong artifact."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from triffusion.components import OutsideProfiles
from triffusion.runtime import (InOrchestrator, TensorRTRuntime, TorchRuntime, create_runtime, format_graph_shapes,
                                parse_graph_shapes)


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
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'; choose one of: in_orchestrator, onnxruntime, "
                                         "tensorrt, torch"):
        create_runtime("tensorflow", tmp_path)


class Recorder(torch.nn.Module):
    """A UNet stand-in that records the dtypes it is called with and echoes the timestep."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.seen.append((sample.dtype, timestep.dtype, encoder_hidden_states.dtype))
        return timestep.float()[:, None, None, None].expand(sample.shape) * self.scale.float()


def test_an_fp16_module_gets_its_timestep_in_fp32():
    runtime = TorchRuntime(Recorder(), ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"], fp16=True)
    timestep = np.array([979.3, 1.25], np.float32)  # fp16 would round 979.3 to 979.5
    out = runtime.run({"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": timestep,
                       "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})["noise_pred"]
    assert runtime.module.seen == [(torch.float16, torch.float32, torch.float16)]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out[:, 0, 0, 0].tolist() == timestep.tolist()


def test_torch_tensors_in_give_torch_tensors_out_with_or_without_a_sync():
    runtime = TorchRuntime(Recorder(), ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"])
    inputs = {"sample": torch.zeros(1, 4, 8, 8), "timestep": torch.tensor([3.0]),
              "encoder_hidden_states": torch.zeros(1, 77, 32)}
    for sync in (True, False):
        out = runtime.run(inputs, sync=sync)["noise_pred"]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and float(out[0, 0, 0, 0]) == 3.0


def test_a_unet_served_in_the_orchestrator_loads_nothing_and_says_where_it_runs(tmp_path):
    runtime = create_runtime(InOrchestrator.KIND, tmp_path)  # the artifact folder is not even read
    assert runtime.input_names == ("sample", "timestep", "encoder_hidden_states")
    with pytest.raises(RuntimeError, match="runs inside the orchestrator .* call text_to_image"):
        runtime.run({})


def test_a_tensorrt_call_takes_the_first_profile_covering_its_shapes():
    runtime = object.__new__(TensorRTRuntime)  # profile choice is plain code; loading an engine needs TensorRT
    runtime.profiles = [{"sample": ((1, 4, 64, 64), (8, 4, 64, 64), (16, 4, 64, 64))},
                        {"sample": ((1, 4, 96, 96), (8, 4, 96, 96), (16, 4, 96, 96))}]
    assert runtime.profile_for({"sample": (6, 4, 96, 96)}) == 1
    assert runtime.profile_for({"sample": (16, 4, 64, 64)}) == 0
    with pytest.raises(OutsideProfiles, match="outside every profile"):
        runtime.profile_for({"sample": (32, 4, 64, 64)})


_THREAD_MASKS = r'''
import glob, os, sys
import numpy as np, onnx
from onnx import TensorProto, helper
from triffusion.runtime import OnnxRuntime

graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [256, 256]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [256, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])])
path = os.path.join(sys.argv[1], "matmul.onnx")
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
runtime = OnnxRuntime(path, spinning=False)
runtime.run({"a": np.ones((256, 256), np.float32), "b": np.ones((256, 256), np.float32)})
masks = {open(task + "/status").read().split("Cpus_allowed_list:")[1].split()[0]
         for task in glob.glob(f"/proc/{os.getpid()}/task/*")}
print(",".join(sorted(masks)))
'''


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs two cores and /proc to see a worker placed outside the process's CPU mask")
def test_an_onnx_session_keeps_every_thread_inside_the_process_cpu_mask(tmp_path):
    # Left to itself onnxruntime sized its pool by the machine and pinned a worker to core 1 in a process
    # under `taskset -c 0`: a replica pinned to core 1 then shared its core with the other replica's worker.
    out = subprocess.run([sys.executable, "-c", _THREAD_MASKS, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, {0}))  # as `taskset -c 0`
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"
