"""Errors the engine raises on purpose, each carrying a message meant for a person."""


class PonderEngineError(Exception):
    """Base of the engine's deliberate errors."""


class ConfigError(PonderEngineError, ValueError):
    """An invalid engine or sampling setting."""


class ModelLoadError(PonderEngineError):
    """A checkpoint that cannot be read: the message names the file and, where known, the tensor."""


class RequestRejected(PonderEngineError, ValueError):
    """A request that can never run (too long for max_model_len or for the whole KV cache)."""


class TensorParallelError(PonderEngineError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run another step."""


class RequestFailed(PonderEngineError):
    """A request that faulted inside the engine while running (the batch it shared went on)."""
