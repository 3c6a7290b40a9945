"""Learned quantization at the layer scope: differentiable quantizers, a layer runner, the trainer.

Whatever is learned is frozen into ordinary plan values (clip ratios, atoms)
before the pipeline quantizes the layer, so nothing downstream knows it was learned.
"""

from quantcompose.learning.fake_layer import FakeQuantLayer, PlaceQuantizers, place_quantizers
from quantcompose.learning.fake_quant import (
    INIT_LOGIT,
    LearnableActClip,
    LearnableWeightClip,
    clamp_to_bounds,
    fake_quantize_range,
    round_ste,
)
from quantcompose.learning.layer_fit import fit_and_freeze, train_options, trainer_options
from quantcompose.learning.let import LearnableScale
from quantcompose.learning.trainer import TrainOptions, TrainReport, calibration_batches, layer_error, train_layer

__all__ = [
    "FakeQuantLayer",
    "INIT_LOGIT",
    "LearnableActClip",
    "LearnableScale",
    "LearnableWeightClip",
    "PlaceQuantizers",
    "TrainOptions",
    "TrainReport",
    "calibration_batches",
    "clamp_to_bounds",
    "fake_quantize_range",
    "fit_and_freeze",
    "layer_error",
    "place_quantizers",
    "round_ste",
    "train_layer",
    "train_options",
    "trainer_options",
]
