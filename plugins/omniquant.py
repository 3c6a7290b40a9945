"""OmniQuant's learnable weight clipping, trained block by block at the layer scope.

Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large
Language Models", ICLR 2024 (arXiv 2308.13137). Each decoder layer's
quantizers are trained so that the quantized layer reproduces the
full-precision layer's output (:mod:`quantcompose.learning.trainer`):

* LWC: per output row (and group) of every weight, learnable lower and upper
  clip ratios ``sigmoid(β)``, ``sigmoid(γ)`` on the row's range (Sec. 3.2),
  initialized at ``sigmoid(4) ≈ 0.98`` as in the authors' code;
* LET's channel-wise scale (Sec. 3.3): ``x·diag(1/s)``, ``W·diag(s)`` at each
  place whose previous module folds a diagonal scale exactly (the norms,
  ``up_proj``; also ``v_proj`` without grouped-query attention), started from
  SmoothQuant's ``s`` with α = 0.5, trained, and frozen into a ``Scale`` that
  the pipeline folds like SmoothQuant's;
* one learnable clip ratio per input place for the per-token activation
  quantizer (not in the paper, whose activations are clipped by LET alone).

After training, the ratios are frozen into the plan (``weight_clip_rows``
and the activation spec's ``clip_ratio``) and the pipeline quantizes the layer
as for any closed-form plan, so the learned clipping replaces both of
``QuantSettings``' clip searches. Training rounds weights to nearest;
with ``weight_quantizer="gptq"`` GPTQ then rounds inside the learned ranges.
Not implemented: LET's channel-wise shift (Llama's q/k/v and gate/up carry
no bias to absorb it) and its Q/K scaling inside attention. With Q/K/V
quantized (``qkv_bits``), training runs with their quantization on, straight
through its rounding, as the layer will run.

Defaults (2 epochs over the first 4 calibration sequences, batch size 1,
lr 0.1 for the clip logits, 1e-2 for LET's log-scale) are sized for
SmolLM2-135M on 2 CPU cores: 8 steps a layer. The clip logits start at 4,
where the sigmoid is flat, so with so few steps they need a larger rate than
the paper's: on SmolLM2's layer 3 (3 epochs of 4 × 128 tokens) lr 5e-3
lowered the loss by 0.1 %, 5e-2 by 4 %, 0.1 by 14 %. The paper's settings,
for reference: 20 epochs, AdamW with lr 5e-3 for LWC and 1e-2 for LET,
weight decay 0, batch size 1, on 128 samples of 2048 tokens of WikiText-2
(``--opt epochs=20 --opt lr=5e-3 --opt samples=0`` with ``--nsamples 128
--calib-seqlen 2048``).

Measured (LWC and activation clip, before LET was added; W4A4 with Q/K/V at 4
bits, round-to-nearest weights, both clip searches off, 16 × 512 random-zipf
calibration, 8 WikiText-2 windows of 512): perplexity 1801 against
round-to-nearest's 2333 (full precision 30.5), quantized in 955 s against
224 s on the shared 2-core machine (load about 5) — not yet minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from quantcompose.hookspecs import hookimpl
from quantcompose.learning import INIT_LOGIT, fit_and_freeze, place_quantizers, train_options, trainer_options
from quantcompose.options import Option, in_range
from quantcompose.strategy import LayerContext, PlaceStats, Plan, QuantSettings, Strategy
from quantcompose.transforms import Scale

from ._duquant_rotation import smooth_factors


class OmniQuant(Strategy):
    """LWC, LET's scale and a learned activation clip per place, fitted per layer against its full-precision output."""

    name = "omniquant"
    description = "OmniQuant: learnable weight clipping trained layer by layer (arXiv 2308.13137)"
    options = {
        **trainer_options(epochs=2, samples=4, paper_epochs=20, paper_samples="128 of 2048 tokens"),
        "lr": Option(0.1, "AdamW learning rate of the weight clip logits (paper: 5e-3 over 20 epochs of 128 samples)",
                     check=in_range(0.0, None, low_open=True)),
        "act_lr": Option(0.1, "AdamW learning rate of the activation clip logits",
                         check=in_range(0.0, None, low_open=True)),
        "let": Option(True, "learn a channel-wise scale at each place that can fold one (LET)"),
        "let_lr": Option(1e-2, "AdamW learning rate of LET's log-scale (paper: 1e-2)",
                         check=in_range(0.0, None, low_open=True)),
        "alpha": Option(0.5, "SmoothQuant migration strength LET's scale starts from", check=in_range(0.0, 1.0)),
    }

    def plan(self, stats: PlaceStats, options: dict[str, Any], settings: QuantSettings) -> Plan:
        # LET learns a scale per channel: where only a group-shared one folds (o_proj under grouped-query
        # attention) or none does, it would run online and cost more than it saves.
        if not options["let"] or stats.absorbable not in ("any", "diagonal"):
            return super().plan(stats, options, settings)
        s = smooth_factors(stats.act_absmax, stats.weight_absmax(), float(options["alpha"]))
        return self.quantizer_plan(Scale(1.0 / s), options, settings)

    def fit_layer(
        self, layer: LayerContext, options: dict[str, Any], settings: QuantSettings
    ) -> dict[str, Plan] | None:
        if settings.wbits >= 16 and settings.abits >= 16:  # nothing is quantized: nothing to learn
            return None
        quantizers = {
            p.name: place_quantizers(
                layer.layer, p, layer.plans[p.name], INIT_LOGIT,
                learn_scale=bool(options["let"]) and isinstance(layer.plans[p.name].transform, Scale),
            )
            for p in layer.places
        }
        rates = {"weight_clips": options["lr"], "act_clips": options["act_lr"], "scales": options["let_lr"]}
        return fit_and_freeze(
            layer, quantizers, rates, train_options(options, settings, layer, self.name),
            lambda name, q, plan: plan.transform if q.scale is None else q.scale.frozen(),
        )


@hookimpl
def quantcompose_strategies() -> Iterator[Strategy]:
    yield OmniQuant()
