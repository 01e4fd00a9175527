import pytest

from triffusion.export.build import build


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = root / "model_repository"
    info = build("tiny", None, out, seed=0, log=lambda *_: None)
    return root, out, info
