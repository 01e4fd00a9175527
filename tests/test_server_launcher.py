"""The launcher against the real bundled tritonserver: busy ports, load failures, clean shutdown."""

import os
import socket
import textwrap

import numpy as np
import pytest

from triffusion.server import ServerError, TritonServer, free_port

ADD_ONE = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() + 1)]) for r in requests]
''')
CONFIG = '''backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_INT32 dims: [ 1 ] } ]
'''


def make_repo(root, name, model_py):
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(CONFIG)
    (root / name / "1" / "model.py").write_text(model_py)
    return root


def ports():
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


def test_busy_port_is_named_with_the_flag_to_change(tmp_path):
    make_repo(tmp_path, "add_one", ADD_ONE)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ServerError, match=rf"port {taken} \(grpc\) is already in use; pass --grpc-port"):
            TritonServer(tmp_path, http_port=free_port(), grpc_port=taken, metrics_port=free_port()).start()


def test_serves_over_http_and_grpc_and_stops_cleanly(tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    make_repo(tmp_path, "add_one", ADD_ONE)
    server = TritonServer(tmp_path, **ports())
    with server:
        assert server.wait_ready(120) > 0
        for module, url in ((httpclient, server.urls["http"]), (grpcclient, server.urls["grpc"])):
            x = module.InferInput("x", [1], "INT32")
            x.set_data_from_numpy(np.array([41], np.int32))
            assert module.InferenceServerClient(url).infer("add_one", [x]).as_numpy("y")[0] == 42
        pgid = os.getpgid(server.process.pid)
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):  # no stub or server process is left in the group
        os.killpg(pgid, 0)


def test_model_that_fails_to_load_is_named(tmp_path):
    make_repo(tmp_path, "broken", "raise ImportError('no such weights')\n")
    with pytest.raises(ServerError, match="broken"):
        with TritonServer(tmp_path, **ports()) as server:
            server.wait_ready(120)


def test_a_server_killed_by_a_signal_while_loading_is_started_once_more(tmp_path):
    """Triton 2.51 sometimes aborts while loading (a python-backend shared-memory lock_exception): the launcher
    starts it once more. The model's first initialize aborts the server, as that crash does."""
    marker = tmp_path / "aborted-once"
    crash_once = textwrap.dedent(f'''
        import os, signal
        from pathlib import Path
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def initialize(self, args):
                marker = Path({str(marker)!r})
                if not marker.exists():
                    marker.touch()
                    os.kill(os.getppid(), signal.SIGABRT)  # the stub's parent: tritonserver

            def execute(self, requests):
                return [pb_utils.InferenceResponse([pb_utils.Tensor(
                    "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() + 1)]) for r in requests]
    ''')
    repo = tmp_path / "repo"
    make_repo(repo, "add_one", crash_once)
    import tritonclient.http as httpclient

    with TritonServer(repo, **ports()) as server:
        server.wait_ready(120)
        x = httpclient.InferInput("x", [1], "INT32")
        x.set_data_from_numpy(np.array([1], np.int32))
        assert httpclient.InferenceServerClient(server.urls["http"]).infer("add_one", [x]).as_numpy("y")[0] == 2
    assert marker.exists()


def test_missing_repository_says_what_to_run(tmp_path):
    with pytest.raises(ServerError, match="triffusion.export build"):
        TritonServer(tmp_path / "nope", **ports()).start()
