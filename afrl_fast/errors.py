"""The errors that cross module boundaries, kept on the ground floor so that raising one never pulls in
the module that usually raises it (config, optim) and cannot close an import circle."""


class ConfigError(ValueError):
    """Bad run input (config file, override, checkpoint, run folder): the tools report it in one line
    and exit with code 2."""


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite; the weights were not updated."""


class ScoringError(ValueError):
    """A model, tokenizer or input that first-token scoring cannot handle; the message says why."""
