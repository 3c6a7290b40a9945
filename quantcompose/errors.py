"""Error types. Every message says what is wrong and what to do about it."""

from __future__ import annotations


class QuantComposeError(Exception):
    """Base class of every error this library raises on purpose."""


class TransformError(QuantComposeError, ValueError):
    """A transform was built from values that do not define an invertible map."""


class HadamardSizeError(TransformError):
    """No Hadamard matrix construction is known for the requested size."""


class QuantSpecError(QuantComposeError, ValueError):
    """A quantizer specification is out of range (bits, group size, clip ratio)."""


class ShapeError(QuantComposeError, ValueError):
    """A tensor's shape does not fit the transform, quantizer or layer."""


class UnknownStrategyError(QuantComposeError, KeyError):
    """No installed strategy plugin has the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(QuantComposeError, ValueError):
    """The model's architecture has no adapter."""


class ModelLoadError(QuantComposeError, OSError):
    """A model (or the package that ships it) could not be found or loaded."""


class CalibrationError(QuantComposeError, ValueError):
    """Calibration data or the activations it produced are unusable (NaN, inf, empty)."""


class DataError(QuantComposeError, OSError):
    """An evaluation or calibration data file is missing or malformed."""


class OptionError(QuantComposeError, ValueError):
    """A strategy option is unknown, of the wrong type, out of range, or conflicts with the settings."""


class SaveError(QuantComposeError, OSError):
    """A model cannot be saved where it was asked to be (bad path, not replaceable, no space, busy)."""


class SaveTargetExistsError(SaveError, FileExistsError):
    """The save target exists and replacing it was not asked for."""


class UsageError(QuantComposeError, ValueError):
    """A command-line argument or API argument is out of range or inconsistent."""



class RecipeError(QuantComposeError, ValueError):
    """A recipe (dict, TOML or YAML file) has an unknown key, a value of the wrong type, or an impossible target."""


class UnknownTaskError(QuantComposeError, ValueError):
    """No evaluation task, group or tag of the lm-evaluation-harness has the requested name."""


class ExportError(QuantComposeError, ValueError):
    """A model cannot be written in the requested serving format."""


class UnsupportedExportSettingsError(ExportError):
    """A layer's quantizer settings are ones the target runtimes cannot run (e.g. W4A4)."""


class UnexportableTransformError(ExportError):
    """A layer's online transform cannot be expressed in the target format, nor folded away exactly."""


class OffloadError(QuantComposeError, ValueError):
    """An offloaded quantization cannot run as asked (a model-wide strategy, a work folder of another run)."""
