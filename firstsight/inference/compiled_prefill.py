"""`hardware.generation=static_compile`'s prefill: the parts of the prompt's forward that
torch.compile fuses well, compiled regionally (one compiled graph per kind of block, shared by all
blocks of that kind), once per model, while the rest stays transformers' own code.

- vision blocks: compiled in place (dynamic shapes), fusing their fp32 rotary and elementwise work;
  the patch embedding as one matrix product (patch_embed_as_matmul). Their attention call (SDPA
  over the frames) runs eagerly, the block's graph broken around it
  (firstsight.models.vision_attention.EAGER_UNDER_COMPILE): compiled, on an H100 it attended over
  all frames of the batch at once.
- the language model's RMSNorms and MLPs: compiled forwards switched on only while a prefill runs
  (language_regions_compiled), so the decode step and any other use run their own code; attention
  stays transformers'.
- tensor-subclass weights (torchao int8 / fp8): their products stay torchao's eager kernels
  (compiler-disabled: inductor's kernels for them took the int8 student's batch-1 prefill from
  22 ms to 1.43 s on an H200), and regions made mostly of them (the MLPs) are not compiled.

Not exact: compiled code keeps fp32 intermediates that the eager code rounds to bf16.
Design notes: docs/design/compiled_prefill.md; measured: docs/decisions/0002-static-decoding.md,
docs/decisions/0010-static-compile-tuning.md.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, List

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from firstsight.models.vision_attention import EAGER_UNDER_COMPILE, attend_eagerly_under_compile

_COMPILED = "_firstsight_prefill_forward"  # a language-model region's compiled forward, kept on the module
_DONE = "_firstsight_prefill_compiled"  # set on a model once compile_prefill_blocks has seen it
_EAGER = "_firstsight_eager_product"  # a subclass-weight Linear's compiler-disabled forward, kept on the module


def _vision_blocks(model: Any) -> Any:
    """A Qwen2-VL model's vision blocks (model.model.visual.blocks); () for any other model."""
    return getattr(getattr(getattr(model, "model", None), "visual", None), "blocks", None) or ()


def _frame_attentions(block: Any) -> List[Any]:
    """A vision block's attention modules (Qwen2-VL: block.attn), which call the vision encoder's
    attention implementation (firstsight.models.vision_attention.frames_attention) with themselves."""
    attention = getattr(block, "attn", None)
    return [attention] if attention is not None else []


def language_regions(model: Any) -> List[Any]:
    """A Qwen2-VL model's language-model RMSNorms and MLPs (per decoder layer: input_layernorm,
    post_attention_layernorm, mlp; then the final norm); [] for any other model."""
    language = getattr(getattr(model, "model", None), "language_model", None)
    layers = getattr(language, "layers", None)
    if layers is None or getattr(language, "norm", None) is None:
        return []
    names = ("input_layernorm", "post_attention_layernorm", "mlp")
    if not all(hasattr(layer, name) for layer in layers for name in names):
        return []
    return [getattr(layer, name) for layer in layers for name in names] + [language.norm]


def subclass_linears(module: Any) -> List[Any]:
    """The Linear layers in `module` whose weight is a tensor subclass (torchao's quantized weights)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and is_traceable_wrapper_subclass(m.weight)]


def compile_prefill_blocks(model: Any) -> int:
    """The vision encoder's blocks torch.compile'd in place (inductor's defaults, dynamic shapes),
    its patch embedding as one matrix product, and the language model's norms and MLPs given
    compiled forwards for language_regions_compiled; all compiled on their first call. Products with
    tensor-subclass weights stay torchao's, and regions holding them uncompiled (module docstring).
    What is compiled already is left as it is. Returns how many blocks and regions were compiled now."""
    if vars(model).get(_DONE):  # every prefill asks: once per model
        return 0
    vars(model)[_DONE] = True
    fresh = [block for block in _vision_blocks(model) if getattr(block, "_compiled_call_impl", None) is None]
    for block in fresh:
        for linear in subclass_linears(block):
            # the class's forward bound to the layer, run as it is (the module docstring says why)
            vars(linear)[_EAGER] = linear.forward = torch.compiler.disable(type(linear).forward.__get__(linear))
        for attention in _frame_attentions(block):
            attend_eagerly_under_compile(attention)  # its SDPA call outside the graph (module docstring)
        block.compile(dynamic=True)
    patch_embed_as_matmul(model, True)
    regions = [
        region for region in language_regions(model) if _COMPILED not in vars(region) and not subclass_linears(region)
    ]
    for region in regions:
        # the class's forward bound to the region (not region.forward: that may be switched on)
        setattr(region, _COMPILED, torch.compile(type(region).forward.__get__(region)))
    return len(fresh) + len(regions)


def uncompile_prefill_blocks(model: Any) -> None:
    """Undo compile_prefill_blocks: every block and region runs its eager forward again."""
    vars(model).pop(_DONE, None)
    for block in _vision_blocks(model):
        block._compiled_call_impl = None  # what nn.Module.compile set; None: the plain call
        for linear in block.modules():
            if _EAGER in vars(linear):
                del vars(linear)[_EAGER], vars(linear)["forward"]
            vars(linear).pop(EAGER_UNDER_COMPILE, None)
    patch_embed_as_matmul(model, False)
    for region in language_regions(model):
        region.__dict__.pop(_COMPILED, None)
        region.__dict__.pop("forward", None)


@contextlib.contextmanager
def language_regions_compiled(model: Any) -> Iterator[int]:
    """Inside: the language model's regions that compile_prefill_blocks compiled run their compiled
    forward (found before the class's by nn.Module's call); after: their own. Yields how many."""
    switched = [region for region in language_regions(model) if _COMPILED in vars(region)]
    for region in switched:
        region.forward = vars(region)[_COMPILED]
    try:
        yield len(switched)
    finally:
        for region in switched:
            region.__dict__.pop("forward", None)


def _patch_embedding_by_matmul(self: Any, hidden_states: Any) -> Any:
    """Qwen2-VL's PatchEmbed.forward as a matrix product: its Conv3d's kernel is its stride and
    covers each patch whole, so each output is the patch's flattened pixels (channel, time, row,
    column: the conv's order) times the kernel's flattened weights. The same sums of products; cuDNN
    ran the bf16 Conv3d as a slow generic kernel (H200, 32 frames: 4.05 ms, torch.profiler). The
    product's own time, and what it buys, were not measured on their own."""
    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def patch_embed_as_matmul(model: Any, on: bool) -> bool:
    """Switch a Qwen2-VL vision encoder's patch embedding to _patch_embedding_by_matmul (on) or back
    to its own forward, in place; False for a model without one of that form (left as it is)."""
    embed = getattr(getattr(getattr(model, "model", None), "visual", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if (
        proj is None
        or tuple(getattr(proj, "kernel_size", ())) != tuple(getattr(proj, "stride", ()))
        or getattr(proj, "padding", None) not in ((0, 0, 0), 0, "valid")
    ):
        return False
    if on:
        embed.forward = types.MethodType(_patch_embedding_by_matmul, embed)  # found before the class's by __call__
    else:
        embed.__dict__.pop("forward", None)
    return True
