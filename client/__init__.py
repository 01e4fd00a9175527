"""Client for the triffusion text-to-image service (tritonclient gRPC/HTTP)."""

from .api import (GenerationError, GenerationHandle, GenerationResult, check_endpoint, generate, request_arrays,
                  start_stream_generation)

__all__ = ["GenerationError", "GenerationHandle", "GenerationResult", "check_endpoint", "generate", "request_arrays",
           "start_stream_generation"]
