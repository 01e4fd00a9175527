"""Fault injection for the fault suite: wraps a model's real adapter (real_model.py beside it) and, while
`faults.json` at the repository root names this model, makes its calls raise, hang or return garbage.

{"unet": {"mode": "raise" | "hang" | "garbage", "times": N}}: the next N executions misbehave (each one
decrements the count; a reloaded stub reads the file afresh)."""

import fcntl
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_spec = importlib.util.spec_from_file_location("real_model", Path(__file__).with_name("real_model.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    def initialize(self, args):
        self._name = json.loads(args["model_config"])["name"]
        self._faults = Path(args["model_repository"]).parent / "faults.json"
        super().initialize(args)

    def _take_fault(self):
        """This model's fault, if any is left, counted down under a file lock."""
        if not self._faults.exists():
            return None
        with open(self._faults, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            faults = json.loads(handle.read() or "{}")
            fault = faults.get(self._name)
            if not fault or fault.get("times", 0) <= 0:
                return None
            fault["times"] -= 1
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(faults))
            return fault["mode"]

    def execute(self, requests):
        mode = self._take_fault()
        if mode == "raise":
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError("injected fault")) for _ in requests]
        if mode == "hang":
            time.sleep(3600)  # the caller's deadline must fire long before this
        responses = super().execute(requests)
        if mode == "garbage":
            garbage = []
            for response in responses:  # the shapes the caller expects, full of NaN
                outputs = [pb_utils.Tensor(t.name(), np.full_like(t.as_numpy(), np.nan))
                           for t in response.output_tensors()]
                garbage.append(pb_utils.InferenceResponse(outputs))
            return garbage
        return responses
