"""OmniQuant's learnable weight clipping, trained block by block at the layer scope.

Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large
Language Models", ICLR 2024 (arXiv 2308.13137). Each decoder layer's
quantizers are trained so that the quantized layer reproduces the
full-precision layer's output (:mod:`quantcompose.learning.trainer`):

* LWC: per output row (and group) of every weight, learnable lower and upper
  clip ratios ``sigmoid(β)``, ``sigmoid(γ)`` on the row's range (Sec. 3.2),
  initialized at ``sigmoid(4) ≈ 0.98`` as in the authors' code;
* one learnable clip ratio per input place for the per-token activation
  quantizer (not in the paper, whose activations are clipped by LET alone).

After training, the ratios are frozen into the plan (``weight_clip_rows``
and the activation spec's ``clip_ratio``) and the pipeline quantizes the layer
as for any closed-form plan, so the learned clipping replaces both of
``QuantSettings``' clip searches. Training rounds weights to nearest;
with ``weight_quantizer="gptq"`` GPTQ then rounds inside the learned ranges.
The paper's learnable equivalent transformation (LET) is not implemented
here yet. Q/K/V quantization after RoPE is not simulated during training.

Defaults are sized for SmolLM2-135M on 2 CPU cores (minutes); the paper's
settings, for reference, are 20 epochs, AdamW with lr 5e-3 for LWC (1e-2 for
LET), weight decay 0, batch size 1, on 128 samples of 2048 tokens of WikiText-2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.learning import INIT_LOGIT, FakeQuantLayer, TrainOptions, place_quantizers, train_layer
from quantcompose.options import Option, in_range, integer_at_least
from quantcompose.strategy import LayerContext, Plan, QuantSettings, Strategy


class OmniQuant(Strategy):
    """LWC and a learned activation clip per place, fitted per layer against its full-precision output."""

    name = "omniquant"
    description = "OmniQuant: learnable weight clipping trained layer by layer (arXiv 2308.13137)"
    options = {
        "epochs": Option(2, "training epochs per layer over the calibration set (paper: 20)",
                         check=integer_at_least(1)),
        "lr": Option(5e-3, "AdamW learning rate of the weight clip bounds (paper: 5e-3)",
                     check=in_range(0.0, None, low_open=True)),
        "act_lr": Option(5e-3, "AdamW learning rate of the activation clip ratios",
                         check=in_range(0.0, None, low_open=True)),
        "batch_size": Option(1, "calibration sequences per training step (paper: 1)", check=integer_at_least(1)),
        "samples": Option(4, "calibration sequences trained on, the first ones; 0: all (paper: 128 of 2048 tokens)",
                          check=integer_at_least(0)),
        "weight_decay": Option(0.0, "AdamW weight decay (paper: 0)", check=in_range(0.0, None)),
    }

    def fit_layer(
        self, layer: LayerContext, options: dict[str, Any], settings: QuantSettings
    ) -> dict[str, Plan] | None:
        quantizers = {
            p.name: place_quantizers(layer.layer, p, layer.plans[p.name], INIT_LOGIT) for p in layer.places
        }
        fake = FakeQuantLayer(layer.layer, quantizers)
        groups = [
            {"params": list(modules.parameters()), "lr": float(options[key])}
            for modules, key in ((fake.weight_clips, "lr"), (fake.act_clips, "act_lr"))
            if len(modules)
        ]
        if not groups:  # 16 bits on both sides: nothing to learn
            return None
        train = TrainOptions(
            epochs=int(options["epochs"]),
            batch_size=int(options["batch_size"]),
            max_samples=int(options["samples"]) or None,
            weight_decay=float(options["weight_decay"]),
            seed=settings.seed,
            progress=layer.progress,
            description=self.name,
        )
        try:
            report = train_layer(layer, groups, fake, train)
        finally:
            fake.close()
        notes = {"clip": "learned", "loss_epoch1": round(report.epoch_losses[0], 6),
                 "loss_final": round(report.epoch_losses[-1], 6)}
        refined: dict[str, Plan] = {}
        for name, q in quantizers.items():
            plan = layer.plans[name]
            refined[name] = replace(
                plan,
                act_spec=None if q.act is None else replace(plan.act_spec, clip_ratio=q.act.frozen_ratio()),
                weight_spec=None if q.weight is None else replace(plan.weight_spec, clip_ratio=1.0),
                weight_clip_rows=None if q.weight is None else q.weight.frozen_bounds(),
                search_act_clip=False,
                search_weight_clip=False,
                notes={**plan.notes, **notes},
            )
        return refined


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield OmniQuant()
