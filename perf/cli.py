"""What the perf command lines share."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error: ...` line, like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")
