"""User-facing errors. Each carries one line that names the problem; the CLI prints it, exit 2."""


class PellucidError(Exception):
    """Base of every error that is the user's input's fault, not a bug of ours."""


class ConfigError(PellucidError):
    """A bad config key, type or value."""


class DataError(PellucidError):
    """A corpus that is missing, empty, unreadable or cannot be fetched."""


class TokenizerError(PellucidError):
    """A tokenizer file that is corrupt, or text the tokenizer cannot represent."""


class WeightsFormatError(PellucidError):
    """A weights file (safetensors, GGUF, HF directory) that is corrupt or unsupported."""


class GGUFFormatError(WeightsFormatError):
    """A GGUF file that breaks the format or our bounds."""


class CheckpointError(PellucidError):
    """A run directory with no usable checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, file too large); the previous one is intact."""


class CapacityError(PellucidError):
    """Not enough KV-cache memory for one more sequence right now (a server answers 429/503)."""


class TrainingError(PellucidError):
    """Training that cannot go on (non-finite loss or gradients)."""
