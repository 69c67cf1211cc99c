"""Errors that end a run with a clear one-line message and a defined exit code."""


class OnnxoptError(Exception):
    """A failure the user should see as one line; exit code 1."""

    exit_code = 1


class UsageError(OnnxoptError):
    """The command line or the API call was wrong; exit code 2."""

    exit_code = 2


class ModelError(OnnxoptError):
    """The input is not a valid, loadable ONNX model."""


class VerificationError(OnnxoptError):
    """An optimized model no longer computes what the original did."""

    def __init__(self, message, pass_name=None, output=None):
        super().__init__(message)
        self.pass_name = pass_name
        self.output = output
