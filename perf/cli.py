"""What the perf command lines share."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error: ...` line, like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def write_json(path, data) -> bool:
    """Write `data` as indented JSON to `path`; on failure print one `error:` line and return False."""
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"error: {path}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return False
    return True


def device_name(device: str) -> str:
    """What a report calls the machine it measured on: the GPU's name, or the CPU and its core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
