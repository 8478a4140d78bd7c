"""Activation ranges of the language model's linear layers on image tokens vs text tokens.

A static INT8/FP8 activation scale is the largest input magnitude seen in calibration (ModelOpt's
max calibrator). Calibrated on captions alone it never sees image tokens, whose hidden states
come from the vision tower (and its deepstack features in the first layers) and can be far
larger or smaller; the scale then clips them, or wastes its range. One unquantized pass over the
calibration batches records, for every ``nn.Linear`` of the decoder and for lm_head, that largest
magnitude on each kind of token, so the report can show where the two differ. A fused MoE experts
module (``gate_up_proj`` ``[E, ...]``) gets two rows, because ModelOpt gives it two input
quantizers, each shared by all experts: under its own name its input (every token's hidden state),
and under ``<name>.down_proj`` the down projection's input (``act(gate) * up`` of each token's
routed experts). The second exists only inside the experts' forward, so the hook recomputes it from
the routing the block hands in, expert by expert as the forward does; a token's value is its
largest over its top-k experts. The pass runs once, when the batches are built, before any
quantizer exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from auto_quantize_model.artifacts import ActivationRange
from auto_quantize_model.backend.lm_forward import decoder_hidden


class RangeRecorder:
    """Forward pre-hooks keeping each linear input's largest magnitude per token kind."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self.names = [row for name, module in modules for row in _rows(name, module)]
        self.image: dict[str, float] = dict.fromkeys(self.names, 0.0)
        self.text: dict[str, float] = dict.fromkeys(self.names, 0.0)
        self.visual: torch.Tensor | None = None
        self.real: torch.Tensor | None = None

    def see(self, name: str, x: torch.Tensor) -> None:
        """Fold ``x`` (``[B, L, H]``, the batch being run, or ``[B * L, H]`` as fused experts take
        it, rows in the batch's order) into ``name``'s ranges."""
        self.see_peaks(name, x.detach().abs().amax(dim=-1).float())

    def see_peaks(self, name: str, peak: torch.Tensor) -> None:
        """Fold per-token magnitudes (``[B, L]`` or flattened ``[B * L]``) into ``name``'s ranges."""
        assert self.visual is not None
        assert self.real is not None
        visual, real = self.visual.to(peak.device), self.real.to(peak.device)
        if peak.dim() == 1:
            visual, real = visual.reshape(-1), real.reshape(-1)
        for kind, mask in ((self.image, visual & real), (self.text, ~visual & real)):
            if bool(mask.any()):
                kind[name] = max(kind[name], float(peak[mask].max()))

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        from auto_quantize_model.backend.experts import is_fused_experts

        def hook(name: str, fused: bool) -> Any:
            def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if not args or not isinstance(args[0], torch.Tensor) or self.visual is None:
                    return
                x = args[0]
                flat = x.dim() == 2 and x.shape[0] == self.visual.numel()
                if x.dim() == 3 or flat:
                    self.see(name, x)
                routed = args[1] if len(args) > 1 else kwargs.get("top_k_index")
                if fused and flat and isinstance(routed, torch.Tensor):
                    self.see_peaks(f"{name}{DOWN}", down_input_peaks(module, x.detach(), routed))

            return record

        handles = [
            module.register_forward_pre_hook(hook(name, is_fused_experts(module)), with_kwargs=True)
            for name, module in self.modules
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


DOWN = ".down_proj"
"""Suffix of a fused experts module's second row: the down projection's input."""


def _rows(name: str, module: nn.Module) -> list[str]:
    from auto_quantize_model.backend.experts import is_fused_experts

    return [name, f"{name}{DOWN}"] if is_fused_experts(module) else [name]


def down_input_peaks(experts: Any, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Per token (``x`` is ``[T, H]``), the largest magnitude of the down projection's input over
    the experts ``routed`` (``[T, k]``) sends it to: ``act(gate) * up``, as the experts compute it."""
    peaks = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for expert in torch.unique(routed).tolist():
        if not 0 <= expert < experts.gate_up_proj.shape[0]:
            continue
        tokens = (routed == expert).any(dim=-1).nonzero().squeeze(-1)
        gate, up = nn.functional.linear(x[tokens], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        peak = (experts.act_fn(gate) * up).abs().amax(dim=-1).float()
        peaks[tokens] = torch.maximum(peaks[tokens], peak)
    return peaks


def linear_layers(model: nn.Module, decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """Full-model names of the decoder's linear layers and fused experts modules, in order."""
    from auto_quantize_model.backend.experts import is_fused_experts

    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    return [
        (f"{prefix}.{name}" if prefix else name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear) or is_fused_experts(module)
    ]


def activation_ranges(
    model: nn.Module, decoder: nn.Module, head_name: str, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[ActivationRange, ...]:
    """Image vs text input ranges of every linear layer (and lm_head, whose input is the decoder's
    output) over ``batches`` (image batches on CPU; run where the decoder is)."""
    from auto_quantize_model.backend.lm_forward import input_device, to_device

    recorder = RangeRecorder(linear_layers(model, decoder))
    head: dict[str, float] = {"image": 0.0, "text": 0.0}
    device = input_device(decoder)
    with torch.no_grad(), recorder.hooked():
        for cpu_batch in batches:
            batch = to_device(cpu_batch, device)
            recorder.visual = batch["visual_pos_masks"]
            recorder.real = batch["real_mask"] != 0
            hidden = decoder_hidden(decoder, batch)
            peak = hidden.abs().amax(dim=-1).float()
            for kind, mask in (
                ("image", recorder.visual & recorder.real),
                ("text", ~recorder.visual & recorder.real),
            ):
                if bool(mask.any()):
                    head[kind] = max(head[kind], float(peak[mask.to(peak.device)].max()))
    found = [ActivationRange(name, recorder.image[name], recorder.text[name]) for name in recorder.names]
    return (*found, ActivationRange(head_name, head["image"], head["text"]))
