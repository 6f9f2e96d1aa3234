"""A forward pass in TransformerLens's weight basis that computes only the positions it is asked for.

Why it exists: every causal number of a run is an intervention at the prediction position P. In a causal model
nothing before P changes under such an edit, so the edited answer logits need only the clean keys/values of the
positions before P and one pass of position P through the layers from the edit onward, then the final norm and
the unembedding at P alone (see :mod:`saecircuits.models.interventions`). The TransformerBridge can do neither
cheaply: its forward recomputes every position through every layer and unembeds every position (with GPT-2's
50,257-token vocabulary that is ~90% of a pass), and its KV-cache path does not apply (TransformerLens 4.3 with
transformers 5 drops the cache on Llama, so the recomputed query attends to itself alone). So this module holds
the model's maths once, in TransformerLens's processed basis, for the block shapes it supports:

- sequential pre-norm blocks ``resid_mid = resid_pre + attn(ln1(resid_pre))``, ``resid_post = resid_mid +
  mlp(ln2(resid_mid))``, then ``ln_final`` and ``W_U``/``b_U``;
- LayerNorm or RMSNorm (with whatever weight/bias the bridge left in the norm: ones/zeros after ``fold_ln``, the
  trained values without it), ``eps`` from the bridge config;
- learned absolute positions (``W_pos``) or rotary positions (rotate-half, full head width) from the Hugging Face
  model's own ``rotary_emb`` module;
- multi-head or grouped-query attention (query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``, as
  ``transformers``' ``repeat_kv``), the attention module's own ``scaling`` (GPT-Neo: none), local layers with the
  model's sliding window (key ``t`` visible from query ``s`` when ``0 <= s - t < window``, GPT-Neo's rule);
- plain MLPs ``act(x W_in + b_in) W_out + b_out`` and gated ones ``(act(x W_gate) * (x W_in)) W_out``, with the
  activation function taken from ``transformers.activations.ACT2FN`` by the model's own config name.

- parallel attention + MLP blocks (GPT-NeoX / Pythia, GPT-J with one shared norm), partial rotary
  (``rotary_pct``, ``rotary_dim``) and GPT-J's rotation of adjacent pairs (:class:`BlockShape`);
- RMSNorms on queries and keys before the rotation, per head (Qwen 3, Gemma 3) or over the whole projection
  (OLMo 2), fired as ``hook_q_normed``/``hook_k_normed`` in the bridge's layout; norms on the attention and MLP
  outputs before they join the residual stream (``ln1_post``/``ln2_post``): after the pre-norms (Gemma 2 / 3) or in
  their place (OLMo 2's post-norm blocks);
- Gemma 2 and 3 (:func:`_gemma_layer_parts`): norms with a ``(1 + w)`` offset (read with their effective weight,
  :func:`saecircuits.models.norms.module_norm_params`), token embeddings times ``sqrt(d_model)`` in the weights'
  dtype, ``query_pre_attn_scalar`` (the attention module's ``scaling``), attention-score soft caps
  ``cap * tanh(s / cap)`` (Gemma 2; before the mask, as transformers), final-logit soft caps (what
  :meth:`Engine.logits` returns is capped), a per-layer-type rotary base (Gemma 3), alternating sliding and global
  layers, GeGLU.

That covers GPT-2, GPT-Neo (global and local layers), Llama / Mistral / Qwen 2 (rotary + GQA, sliding windows),
GPT-NeoX / Pythia, GPT-J, Qwen 3, OLMo 2 and Gemma 2 / 3. Every weight is read from the bridge after its weight
processing, and :meth:`Engine.from_bridge` refuses any model whose log-probs differ from the Hugging Face forward on
a check sequence that crosses every sliding window (:meth:`Engine.check_against`), so an unsupported architecture
fails loudly (the intervention layer then runs full bridge forwards instead). ``tests/models/test_engine.py``,
``test_architectures.py`` and ``test_gemma.py`` check every hook activation against the bridge for each
architecture, on right-padded batches.

Tensor layout: each activation inside a call is ``[B, F, S, *shape]``: ``B`` prompts, ``F`` variants (1 while every
variant still shares the value, ``V`` after the first edit that makes them differ), ``S`` positions computed in this
call. Hook functions receive and return that layout (TransformerLens's ``[batch, pos, *shape]`` with ``F``
inserted; the attention pattern ``[B, F, n_heads, S, keys]``); under a cached prefix the pattern is the new
position's row over every cached key (:meth:`Engine._prefix_attention_pattern`).

Why one module of ~780 lines: the forward (embeddings, norms, attention with and without a cached prefix, MLPs,
both block shapes, logits) is one piece of maths whose hooks must fire in TransformerLens's order; kept together,
that order and the exactness tests against the bridge read against one file. What is read from each architecture
(block shape, norms, rotary, windows, Gemma's parts) and the tensor helpers are in
:mod:`saecircuits.models.engine_arch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from saecircuits.models.engine_arch import (
    BlockShape,
    EngineError,
    _apply_rotary,
    _block_shape,
    _embed_scale,
    _gemma_layer_parts,
    _heads,
    _hf_last_logits,
    _is_gpt_neo,
    _layer_windows,
    _model_windows,
    _norm_params,
    _optional_norm,
    _qk_norm_weight,
    _rotary_fn,
    _softcap,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BlockShape",
    "Engine",
    "EngineError",
    "KVPrefix",
    "HookFns",
    "layer_hook_names",
    "stage_of_hook",
    "UNEMBED_CHUNK_FLOATS",
]

HookFns = Mapping[str, Sequence[Callable[[torch.Tensor], torch.Tensor | None]]]
"""Hook name -> functions called in order on the activation; a function returns the new value or None (read)."""

UNEMBED_CHUNK_FLOATS = 1 << 22
"""Logits made and reduced at once when many rows are unembedded (16 MB of float32: 83 rows of GPT-2's 50,257-token
vocabulary). Below glibc's largest mmap threshold (32 MB) a chunk's buffers are reused from the heap; a 64 MB chunk
is a fresh mmap each time, whose page faults made unembedding plus log-sum-exp 1.4x slower (measured at 2 threads).
The chunk size changes the values by float rounding at most (the BLAS kernel may depend on the rows)."""

# Hook names of one block, in execution order, and the sub-block ("attn" = 0, "mlp" = 1) each belongs to.
_BLOCK_HOOKS = (
    ("hook_resid_pre", 0),
    ("ln1.hook_scale", 0),
    ("ln1.hook_normalized", 0),
    ("attn.hook_q", 0),
    ("attn.hook_k", 0),
    ("attn.hook_v", 0),
    ("attn.hook_q_normed", 0),
    ("attn.hook_k_normed", 0),
    ("attn.hook_rot_q", 0),
    ("attn.hook_rot_k", 0),
    ("attn.hook_pattern", 0),
    ("attn.hook_z", 0),
    ("ln1_post.hook_scale", 0),
    ("ln1_post.hook_normalized", 0),
    ("hook_attn_out", 0),
    ("hook_resid_mid", 1),
    ("ln2.hook_scale", 1),
    ("ln2.hook_normalized", 1),
    ("mlp.hook_pre", 1),
    ("mlp.hook_pre_linear", 1),
    ("mlp.hook_post", 1),
    ("ln2_post.hook_scale", 1),
    ("ln2_post.hook_normalized", 1),
    ("hook_mlp_out", 1),
    ("hook_resid_post", 1),
)
_TOP_HOOKS = ("hook_embed", "hook_pos_embed")
_FINAL_HOOKS = ("ln_final.hook_scale", "ln_final.hook_normalized")


def layer_hook_names(layer: int) -> list[str]:
    """The TransformerLens hook names of block ``layer`` that the engine fires, in execution order."""
    return [f"blocks.{layer}.{name}" for name, _ in _BLOCK_HOOKS]


def stage_of_hook(name: str, n_layers: int) -> tuple[int, int]:
    """Where a hook fires, as ``(layer, sub)`` ordered like execution.

    ``(-1, 0)``: embeddings; ``(L, 0)``: block L's attention half (from ``hook_resid_pre``); ``(L, 1)``: its MLP half
    (from ``hook_resid_mid``); ``(n_layers, 0)``: the final norm.

    Raises:
        EngineError: a hook name the engine does not fire.
    """
    if name in _TOP_HOOKS:
        return (-1, 0)
    if name in _FINAL_HOOKS:
        return (n_layers, 0)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer = int(parts[1])
        for hook, sub in _BLOCK_HOOKS:
            if hook == parts[2] and 0 <= layer < n_layers:
                return (layer, sub)
    raise EngineError(
        f"hook {name!r} is not one the engine fires; use the TransformerLens names of "
        f"{', '.join(_TOP_HOOKS + tuple(h for h, _ in _BLOCK_HOOKS) + _FINAL_HOOKS)} (blocks.L.<name>)"
    )


@dataclass
class _Layer:
    W_Q: torch.Tensor  # [h, d_model, d_head]
    b_Q: torch.Tensor  # [h, d_head]
    W_K: torch.Tensor  # [kv, d_model, d_head]
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor  # [h, d_head, d_model]
    b_O: torch.Tensor  # [d_model]
    ln1: tuple[torch.Tensor, torch.Tensor | None] | None  # None: no norm before attention (OLMo 2)
    ln2: tuple[torch.Tensor, torch.Tensor | None] | None  # None: no norm before the MLP (OLMo 2; GPT-J shares ln1)
    W_in: torch.Tensor  # [d_model, d_mlp]
    b_in: torch.Tensor
    W_gate: torch.Tensor | None
    W_out: torch.Tensor  # [d_mlp, d_model]
    b_out: torch.Tensor
    scale: float
    window: int | None
    q_norm: torch.Tensor | None = None  # RMSNorm weight on queries: [d_head] per head, [n_heads * d_head] whole
    k_norm: torch.Tensor | None = None  # likewise on keys ([d_head] or [n_kv_heads * d_head])
    # norms on the attention and MLP outputs before they join the residual stream: after ln1/ln2 (Gemma 2 / 3), in
    # their place (OLMo 2)
    ln1_post: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ln2_post: tuple[torch.Tensor, torch.Tensor | None] | None = None
    # Gemma (None elsewhere): the attention-score soft cap (Gemma 2) and a per-layer rotary (Gemma 3's local layers
    # use their own base)
    softcap: float | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class KVPrefix:
    """Cached keys/values of one layer for a batch of prompts (read-only).

    Attributes:
        keys, values: ``[B, n_kv_heads, T, d_head]``, keys after the rotary rotation (TransformerLens's
            ``hook_rot_k``; ``hook_k`` for learned positions).
        valid: bool ``[B, T]``: which cached positions a query may see (``t < P_b`` for an intervention at P).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


_FUSED_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "relu": torch.nn.functional.relu,
}


def _param(value) -> torch.Tensor | None:
    return None if value is None else value.detach()


def _bridge_attr(model, name: str):
    """``model.<name>`` or None for the bias-free parameters TransformerLens refuses with AttributeError."""
    try:
        return _param(getattr(model, name))
    except AttributeError:
        return None


class Engine:
    """The model's maths in TransformerLens's processed basis, for the positions a call asks for.

    Build it with :meth:`from_bridge`; then :meth:`forward` runs a batch from token ids (all positions) or from a
    residual stream at given positions with cached key/value prefixes (one position per prompt for interventions).
    """

    def __init__(
        self,
        *,
        layers: list[_Layer],
        norm: str,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        W_E: torch.Tensor,
        W_pos: torch.Tensor | None,
        rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
        ln_final: tuple[torch.Tensor, torch.Tensor | None],
        W_U: torch.Tensor,
        b_U: torch.Tensor,
        n_ctx: int,
        shape: BlockShape | None = None,
        embed_scale: float | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        self.layers = layers
        self.shape = shape or BlockShape()
        self.n_layers = len(layers)
        self.norm = norm
        self.eps = eps
        self.act = act
        self.W_E = W_E
        self.W_pos = W_pos
        self.rotary = rotary
        self.ln_final = ln_final
        self.W_U = W_U
        self.b_U = b_U
        self.n_ctx = n_ctx
        self.embed_scale = embed_scale  # Gemma: token embeddings times sqrt(d_model), in the weights' dtype
        self.logit_softcap = logit_softcap  # Gemma: logits = cap * tanh(pre-cap logits / cap)
        self.d_model = W_E.shape[1]
        self.d_vocab = W_U.shape[1]
        self.n_heads = layers[0].W_Q.shape[0]
        self.n_kv_heads = layers[0].W_K.shape[0]
        self.d_head = layers[0].W_Q.shape[2]

    # ------------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_bridge(cls, model, *, check: bool = True) -> Engine:
        """Read every weight of a TransformerBridge (after its weight processing) into an engine.

        Args:
            model: a ``TransformerBridge`` over a Hugging Face causal LM, with legacy hook names on
                (``enable_compatibility_mode``, as :func:`saecircuits.models.load.load_model` does).
            check: run a random token batch longer than every attention window through the engine and the Hugging
                Face model and require equal log-probs (:meth:`check_against`).

        Returns:
            An :class:`Engine` holding detached references to the bridge's weights (no copies where TransformerLens
            returns views).

        Raises:
            EngineError: a block shape the engine does not compute (ALiBi, GPT-J's interleaved rotary, norms other
                than LayerNorm/RMSNorm, ...), or log-probs that differ from the Hugging Face model's.
        """
        from transformers.activations import ACT2FN

        cfg = model.cfg
        hf = getattr(model, "original_model", None)
        if hf is None:
            raise EngineError("the engine needs a TransformerBridge over a Hugging Face model (original_model)")
        hf_cfg = hf.config
        shape = _block_shape(model, hf)
        if getattr(cfg, "use_normalization_before_and_after", False):
            raise EngineError("blocks with norms before and after each sub-layer are not supported by the engine")
        norm_type = str(getattr(cfg, "normalization_type", "LN"))
        if norm_type.startswith("LN"):
            norm = "LN"
        elif norm_type.startswith("RMS"):
            norm = "RMS"
        else:
            raise EngineError(f"normalization_type {norm_type!r} is not supported by the engine")
        act_name = (getattr(hf_cfg, "activation_function", None) or getattr(hf_cfg, "hidden_activation", None)
                    or getattr(hf_cfg, "hidden_act", None))
        if act_name not in ACT2FN:
            raise EngineError(f"MLP activation {act_name!r} is not known to transformers' ACT2FN")
        # torch's fused kernels for the functions transformers writes out op by op (same formula; the check
        # below compares the logits); anything else runs transformers' own module
        act = _FUSED_ACTS.get(act_name, ACT2FN[act_name])

        n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
        W_Q, W_K, W_V, W_O = (_bridge_attr(model, n) for n in ("W_Q", "W_K", "W_V", "W_O"))
        W_in, W_out, W_gate = (_bridge_attr(model, n) for n in ("W_in", "W_out", "W_gate"))
        if any(w is None for w in (W_Q, W_K, W_V, W_O, W_in, W_out)):
            raise EngineError("the bridge does not expose W_Q/W_K/W_V/W_O/W_in/W_out for this model")
        gated = bool(getattr(cfg, "gated_mlp", False))
        if gated != (W_gate is not None):
            raise EngineError("gated_mlp and W_gate disagree; this MLP shape is not supported by the engine")
        d_model, d_head = W_Q.shape[2], W_Q.shape[3]
        d_mlp = W_in.shape[2]
        dtype, device = W_Q.dtype, W_Q.device

        def bias(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            b = _bridge_attr(model, name)
            return torch.zeros((n_layers, *shape), dtype=dtype, device=device) if b is None else b

        b_Q, b_K, b_V = bias("b_Q", (n_heads, d_head)), bias("b_K", W_K.shape[1:2] + (d_head,)), bias(
            "b_V", W_V.shape[1:2] + (d_head,)
        )
        b_O, b_in, b_out = bias("b_O", (d_model,)), bias("b_in", (d_mlp,)), bias("b_out", (d_model,))

        windows = _layer_windows(hf, n_layers)
        layers = []
        for layer in range(n_layers):
            block = model.blocks[layer]
            hf_attn = getattr(block.attn, "original_component", None)
            scaling = getattr(hf_attn, "scaling", None)
            if scaling is None:
                scaling = 1.0 if _is_gpt_neo(hf) else d_head**-0.5
            layers.append(
                _Layer(
                    W_Q=W_Q[layer], b_Q=b_Q[layer], W_K=W_K[layer], b_K=b_K[layer], W_V=W_V[layer], b_V=b_V[layer],
                    W_O=W_O[layer], b_O=b_O[layer],
                    ln1=_optional_norm(block, "ln1"), ln2=_optional_norm(block, "ln2"),
                    W_in=W_in[layer], b_in=b_in[layer], W_gate=None if W_gate is None else W_gate[layer],
                    W_out=W_out[layer], b_out=b_out[layer],
                    scale=float(scaling), window=windows[layer],
                    q_norm=_qk_norm_weight(block, hf_attn, "q_norm"), k_norm=_qk_norm_weight(block, hf_attn, "k_norm"),
                    ln1_post=_optional_norm(block, "ln1_post"), ln2_post=_optional_norm(block, "ln2_post"),
                    **_gemma_layer_parts(hf_attn, hf, d_head),
                )
            )
        pos_type = getattr(cfg, "positional_embedding_type", "standard")
        W_pos, rotary = None, None
        if pos_type == "standard":
            W_pos = _bridge_attr(model, "W_pos")
        elif pos_type == "rotary":
            rotary = _rotary_fn(hf, d_head)
        else:
            raise EngineError(f"positional_embedding_type {pos_type!r} is not supported by the engine")
        W_U = _bridge_attr(model, "W_U")
        b_U = _bridge_attr(model, "b_U")
        if b_U is None:
            b_U = torch.zeros(W_U.shape[1], dtype=dtype, device=device)
        engine = cls(
            layers=layers,
            norm=norm,
            eps=float(getattr(cfg, "eps", 1e-5)),
            act=act,
            W_E=_bridge_attr(model, "W_E"),
            W_pos=W_pos,
            rotary=rotary,
            ln_final=_norm_params(model.ln_final),
            W_U=W_U,
            b_U=b_U,
            n_ctx=int(cfg.n_ctx),
            shape=shape,
            embed_scale=_embed_scale(hf),
            logit_softcap=getattr(hf_cfg, "final_logit_softcapping", None),
        )
        if check:
            engine.check_against(model)
        return engine

    def restart_stage(self, stage: tuple[int, int]) -> tuple[int, int]:
        """The half-block a recomputation that must fire hooks of ``stage`` starts from: ``stage`` itself, except
        the MLP half of a parallel block, whose MLP reads ``hook_resid_pre``: the whole block, ``(layer, 0)``."""
        return (stage[0], 0) if self.shape.parallel and stage[1] == 1 else stage

    def check_against(self, model, *, seq_len: int | None = None, seed: int = 0) -> float:
        """Compare this engine's log-probs with the Hugging Face model's own forward (``model.original_model``, the
        reference the bridge wraps) on random tokens; return the max abs difference (nats).

        The default sequence crosses every sliding/local window the Hugging Face config names (``sliding_window``,
        ``window_size``, per-layer ``layer_types``), not only those the engine read, so a wrong window cannot pass.
        Only the last ``min(n, 24)`` positions (past every window) are unembedded on either side (the Hugging Face
        forward's ``logits_to_keep``): no ``[tokens, d_vocab]`` logits for a long window and a large vocabulary
        (Gemma 2: 4,104 x 256,000, 4 GB). Two rows; one when the sequence is longer than 64 tokens.

        Args:
            seq_len: tokens per row; default 24, or 16 past the widest window, capped at ``n_ctx``.

        Raises:
            EngineError: the difference exceeds ``1e-4 * (1 + max |logit|)`` (fp32; 2e-2 for 16-bit weights).
        """
        hf = getattr(model, "original_model", model)
        if seq_len is None:  # the windows the Hugging Face config declares, not the engine's own reading of them
            windows = _model_windows(model) + [w for w in _layer_windows(hf, self.n_layers) if w is not None]
            seq_len = max([24] + [w + 16 for w in windows])
        gen = torch.Generator().manual_seed(seed)
        n = min(seq_len, self.n_ctx)
        keep = min(n, 24)
        tokens = torch.randint(0, self.d_vocab, (2 if n <= 64 else 1, n), generator=gen).to(self.W_E.device)
        with torch.no_grad():
            ref = _hf_last_logits(hf, tokens, keep)
            out = self.logits(self.forward_tokens(tokens)[:, :, -keep:])[:, 0]
        if not bool(torch.isfinite(ref).all()):  # the model itself fails (float16 overflow), not the engine's shape
            raise EngineError(f"the Hugging Face model's own logits are not finite (inf/NaN) in "
                              f"{str(self.W_E.dtype).removeprefix('torch.')} on {n} random tokens")
        diff = float((out.log_softmax(-1) - ref.log_softmax(-1)).abs().max())
        tol = (1e-4 if self.W_E.dtype == torch.float32 else 2e-2) * (1.0 + float(ref.abs().max()))
        if not diff <= tol:
            raise EngineError(
                f"the engine's log-probs differ from the Hugging Face model's by {diff:.3g} (tolerance {tol:.3g}) "
                f"on {n} tokens; this model's blocks are not of a shape the engine computes"
            )
        return diff

    # ------------------------------------------------------------------------------------------------------------
    # pieces

    @staticmethod
    def _fire(hooks: HookFns | None, name: str, x: torch.Tensor) -> torch.Tensor:
        if hooks is None:
            return x
        for fn in hooks.get(name, ()):
            out = fn(x)
            if out is not None:
                # an edit computed in float32 (an SAE's, edit_dtype) goes back into a bf16 stream in the stream's
                # dtype, as the bridge's own hooks do (models.hooks), so the next matmul sees one dtype
                x = out if out.dtype == x.dtype else out.to(x.dtype)
        return x

    def _norm(self, x: torch.Tensor, params, prefix: str, hooks: HookFns | None) -> torch.Tensor:
        w, b = params
        dtype = x.dtype
        h = x.float() if dtype not in (torch.float32, torch.float64) else x
        if self.norm == "LN":
            h = h - h.mean(-1, keepdim=True)
        scale = self._fire(hooks, f"{prefix}.hook_scale", (h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        h = self._fire(hooks, f"{prefix}.hook_normalized", h / scale)
        h = h * w
        if b is not None:
            h = h + b
        return h.to(dtype)

    def _attention(
        self,
        layer: int,
        xn: torch.Tensor,
        qpos: torch.Tensor,
        prefix: KVPrefix | None,
        hooks: HookFns | None,
        keep_kv: list | None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of block ``layer`` for the positions in ``xn [B, F, S, d_model]`` at absolute ``qpos [B, S]``.

        ``keep``: int64 ``[S']`` indices into ``S`` (increasing): queries (and the output ``[B, F, S', d_model]``)
        at those positions only, keys and values at every position (the hooks from ``hook_q`` on see ``S'``)."""
        lw = self.layers[layer]
        name = f"blocks.{layer}.attn"
        xq, qpos_q = (xn, qpos) if keep is None else (xn[:, :, keep], qpos[:, keep])
        q = self._fire(hooks, f"{name}.hook_q", torch.einsum("bfsd,hde->bfshe", xq, lw.W_Q) + lw.b_Q)
        k = self._fire(hooks, f"{name}.hook_k", torch.einsum("bfsd,hde->bfshe", xn, lw.W_K) + lw.b_K)
        v = self._fire(hooks, f"{name}.hook_v", torch.einsum("bfsd,hde->bfshe", xn, lw.W_V) + lw.b_V)
        if lw.q_norm is not None:
            q = self._fire_qk_normed(hooks, f"{name}.hook_q_normed", self._qk_norm(q, lw.q_norm), q)
        if lw.k_norm is not None:
            k = self._fire_qk_normed(hooks, f"{name}.hook_k_normed", self._qk_norm(k, lw.k_norm), k)
        rotary = lw.rotary or self.rotary
        if rotary is not None:
            cos, sin = rotary(qpos)  # [B, S, rotary_dim]
            cos, sin = cos[:, None, :, None, :].to(q.dtype), sin[:, None, :, None, :].to(q.dtype)
            cq, sq = (cos, sin) if keep is None else (cos[:, :, keep], sin[:, :, keep])
            pairs = self.shape.rotary_interleaved
            q = self._fire(hooks, f"{name}.hook_rot_q", _apply_rotary(q, cq, sq, pairs))
            k = self._fire(hooks, f"{name}.hook_rot_k", _apply_rotary(k, cos, sin, pairs))
        if keep_kv is not None:
            keep_kv.append((k, v))
        F = max(q.shape[1], k.shape[1], v.shape[1])
        if q.shape[1] != F:  # an edit of keys or values made the variants differ: every variant has its query
            q = q.expand(q.shape[0], F, *q.shape[2:])
        B, F, S, H, E = q.shape
        K = self.n_kv_heads
        G = H // K
        wants_pattern = hooks is not None and f"{name}.hook_pattern" in hooks
        if wants_pattern and keep is not None:
            raise EngineError(f"{name}.hook_pattern is fired for every query position only (no kept positions)")
        if keep is None and prefix is None and not wants_pattern and lw.softcap is None and bool((qpos == torch.arange(S, device=qpos.device)).all()):
            # a whole sequence from position 0: torch's fused attention (no [S, S] pattern is materialised)
            z = self._fused_attention(q, k, v, lw, B, F, S, H, E, G)
            z = self._fire(hooks, f"{name}.hook_z", z.to(xn.dtype))
            return torch.einsum("bfshe,hed->bfsd", z, lw.W_O) + lw.b_O
        qg = q.reshape(B, F, S, K, G, E).float()
        # scores against the new positions themselves: [B, F, K, G, S, S']
        own = _softcap(torch.einsum("bfskge,bftke->bfkgst", qg, k.float()) * lw.scale, lw.softcap)
        d = qpos_q[:, :, None] - qpos[:, None, :]  # [B, S, S'] query minus key position
        ok = d >= 0
        if lw.window is not None:
            ok = ok & (d < lw.window)
        own = own.masked_fill(~ok[:, None, None, None], float("-inf"))
        if prefix is None:
            pattern = torch.softmax(own, dim=-1)
            if wants_pattern:
                pattern = self._fire(hooks, f"{name}.hook_pattern", pattern.reshape(B, F, H, S, S)).reshape(
                    B, -1, K, G, S, S
                )  # an edit may turn F = 1 into V variants
            z = torch.einsum("bfkgst,bftke->bfskge", pattern, v.float())
        elif wants_pattern:
            z = self._prefix_attention_pattern(qg, own, v, prefix, qpos, lw, hooks, f"{name}.hook_pattern")
        else:
            z = self._prefix_attention(qg, own, v, prefix, qpos_q, lw)
        z = self._fire(hooks, f"{name}.hook_z", z.reshape(B, -1, S, H, E).to(xn.dtype))  # F may grow at the pattern
        return torch.einsum("bfshe,hed->bfsd", z, lw.W_O) + lw.b_O

    def _fire_qk_normed(self, hooks: HookFns | None, name: str, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Fire a q/k norm output in the bridge's layout (per head ``[B, F, heads, S, d_head]``, over the projection
        ``[B, F, S, heads * d_head]``); return it as ``like``'s ``[B, F', S, heads, d_head]``."""
        if self.shape.qk_norm == "head":
            return self._fire(hooks, name, x.transpose(2, 3)).transpose(2, 3)
        return _heads(self._fire(hooks, name, x), like)

    def _qk_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of queries or keys ``[B, F, S, heads, d_head]`` as the Hugging Face attention module computes it:
        over each head (Qwen 3), or over the whole projection (OLMo 2, ``weight [heads * d_head]``). Returned as
        ``[B, F, S, heads, d_head]`` per head, ``[B, F, S, heads * d_head]`` over the projection."""
        dtype = x.dtype
        h = x.float()
        if self.shape.qk_norm == "proj":
            h = h.flatten(-2)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.shape.qk_eps)
        return (weight.float() * h).to(dtype)

    @staticmethod
    def _prefix_attention(qg, own, v, prefix: KVPrefix, qpos, lw: _Layer) -> torch.Tensor:
        """Attention of new positions over cached keys ``< P`` and over themselves, without concatenating them.

        ``qg [B, F, S, K, G, E]`` queries (G query heads per key/value head), ``own [B, F, K, G, S, S']`` the masked
        scores against the new positions' own keys, ``v [B, F, S', K, E]``. The cached keys are shared by every
        variant, so their scores are one batched matmul per prompt and key/value head; the two softmax parts are
        merged with a common maximum. Returns ``z [B, F, S, K, G, E]``.
        """
        B, F, S, K, G, E = qg.shape
        T = prefix.keys.shape[2]
        qh = qg.permute(0, 3, 1, 2, 4, 5).reshape(B, K, F * S * G, E)
        pre = torch.matmul(qh, prefix.keys.float().transpose(-1, -2)).mul_(lw.scale)  # [B, K, F*S*G, T]
        pre = _softcap(pre, lw.softcap)
        dp = qpos[:, :, None] - torch.arange(T, device=qpos.device)[None, None, :]  # [B, S, T]
        okp = (dp >= 0) & prefix.valid[:, None, :]
        if lw.window is not None:
            okp = okp & (dp < lw.window)
        bias = torch.zeros(B, S, T, device=qg.device).masked_fill_(~okp, float("-inf"))
        pre = pre.view(B, K, F, S, G, T).add_(bias[:, None, None, :, None, :])
        own = own.permute(0, 2, 1, 4, 3, 5)  # [B, K, F, S, G, S']
        top = torch.maximum(pre.amax(-1), own.amax(-1)).detach()[..., None]  # any shift gives the same softmax
        p_pre = pre.sub_(top).exp_()
        p_own = (own - top).exp()
        total = p_pre.sum(-1) + p_own.sum(-1)  # [B, K, F, S, G]
        z = torch.matmul(p_pre.view(B, K, F * S * G, T), prefix.values.float()).view(B, K, F, S, G, E)
        z = z + torch.einsum("bkfsgt,bftke->bkfsge", p_own, v.float())
        z = z / total[..., None]
        return z.permute(0, 2, 3, 1, 4, 5)  # [B, F, S, K, G, E]

    def _prefix_attention_pattern(
        self, qg, own, v, prefix: KVPrefix, qpos, lw: _Layer, hooks: HookFns, hook: str
    ) -> torch.Tensor:
        """:meth:`_prefix_attention` with the pattern materialised and fired at ``hook``, for one new position.

        The pattern is the query row of the new position over every key of the cached sequence, as the full
        pass's ``[B, F, n_heads, 1, T]`` (cached keys ``< P``, the position's own key at column P, zeros after P
        and outside the window), so a read or edit of ``hook_pattern`` at P sees what it sees in a full forward.
        Returns ``z [B, F, 1, K, G, E]``.

        Raises:
            EngineError: more than one new position per prompt.
        """
        B, F, S, K, G, E = qg.shape
        if S != 1:
            raise EngineError(f"{hook} is fired under a cached prefix for one new position per prompt only")
        T = prefix.keys.shape[2]
        pre = _softcap(torch.einsum("bfskge,bkte->bfkgst", qg, prefix.keys.float()) * lw.scale, lw.softcap)
        dp = qpos[:, :, None] - torch.arange(T, device=qpos.device)[None, None, :]  # [B, 1, T]
        okp = (dp > 0) & prefix.valid[:, None, :]  # column P holds the position's own key, below
        if lw.window is not None:
            okp = okp & (dp < lw.window)
        pre = pre.masked_fill(~okp[:, None, None, None], float("-inf"))
        col = qpos[:, None, None, None, :, None].expand(B, F, K, G, S, 1)
        scores = pre.scatter(-1, col, own.expand(B, F, K, G, S, 1))
        H = K * G
        pattern = self._fire(hooks, hook, torch.softmax(scores, dim=-1).reshape(B, -1, H, S, T))
        pattern = pattern.reshape(B, -1, K, G, S, T).float()
        p_own = pattern.gather(-1, col.expand(B, pattern.shape[1], K, G, S, 1))
        p_pre = pattern.scatter(-1, col.expand(B, pattern.shape[1], K, G, S, 1), 0.0)
        z = torch.einsum("bfkgst,bkte->bfskge", p_pre, prefix.values.float())
        return z + torch.einsum("bfkgst,bftke->bfskge", p_own, v.float())

    @staticmethod
    def _fused_attention(q, k, v, lw: _Layer, B, F, S, H, E, G) -> torch.Tensor:
        """Causal (and windowed) attention of a whole sequence with ``scaled_dot_product_attention``: ``[B,F,S,H,E]``."""
        Fk = k.shape[1]
        qh = q.reshape(B * F, S, H, E).transpose(1, 2).float()
        kh = k.expand(B, F, *k.shape[2:]) if Fk != F else k
        vh = v.expand(B, F, *v.shape[2:]) if v.shape[1] != F else v
        kh = kh.reshape(B * F, S, -1, E).transpose(1, 2).float()
        vh = vh.reshape(B * F, S, -1, E).transpose(1, 2).float()
        if G > 1:  # query head h reads key/value head h // G (transformers' repeat_kv)
            kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if lw.window is None:
            out = sdpa(qh, kh, vh, is_causal=True, scale=lw.scale)
        else:
            d = torch.arange(S, device=q.device)[:, None] - torch.arange(S, device=q.device)[None, :]
            out = sdpa(qh, kh, vh, attn_mask=(d >= 0) & (d < lw.window), scale=lw.scale)
        return out.transpose(1, 2).reshape(B, F, S, H, E)

    def _mlp(self, layer: int, xn: torch.Tensor, hooks: HookFns | None) -> torch.Tensor:
        lw = self.layers[layer]
        name = f"blocks.{layer}.mlp"
        if lw.W_gate is None:
            pre = self._fire(hooks, f"{name}.hook_pre", xn @ lw.W_in + lw.b_in)
            post = self.act(pre)
        else:
            pre = self._fire(hooks, f"{name}.hook_pre", xn @ lw.W_gate)
            lin = self._fire(hooks, f"{name}.hook_pre_linear", xn @ lw.W_in + lw.b_in)
            post = self.act(pre) * lin
        post = self._fire(hooks, f"{name}.hook_post", post)
        return post @ lw.W_out + lw.b_out  # a norm on it (ln2_post: Gemma, OLMo 2) is applied in _block

    def _block(
        self,
        layer: int,
        x: torch.Tensor,
        qpos: torch.Tensor,
        prefix: KVPrefix | None,
        hooks: HookFns | None,
        *,
        start_sub: int = 0,
        keep_kv: list | None = None,
        keep_resid: dict | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lw = self.layers[layer]
        name = f"blocks.{layer}"
        if self.shape.parallel:
            if keep is not None:
                raise EngineError("a parallel attention + MLP block is computed at every position (no kept positions)")
            if start_sub != 0:
                raise EngineError("a parallel attention + MLP block is recomputed from its hook_resid_pre")
            return self._parallel_block(layer, x, qpos, prefix, hooks, keep_kv=keep_kv, keep_resid=keep_resid)
        if start_sub == 0:
            x = self._fire(hooks, f"{name}.hook_resid_pre", x)
            if keep_resid is not None:
                keep_resid[(layer, 0)] = x
            xn = x if lw.ln1 is None else self._norm(x, lw.ln1, f"{name}.ln1", hooks)
            attn = self._attention(layer, xn, qpos, prefix, hooks, keep_kv, keep)
            if lw.ln1_post is not None:  # Gemma, OLMo 2: the attention's output is normed before it joins the stream
                attn = self._norm(attn, lw.ln1_post, f"{name}.ln1_post", hooks)
            attn = self._fire(hooks, f"{name}.hook_attn_out", attn)
            x = (x if keep is None else x[:, :, keep]) + attn
        elif keep is not None:
            x = x[:, :, keep]
        x = self._fire(hooks, f"{name}.hook_resid_mid", x)
        if keep_resid is not None:
            keep_resid[(layer, 1)] = x
        xn = x if lw.ln2 is None else self._norm(x, lw.ln2, f"{name}.ln2", hooks)
        mlp = self._mlp(layer, xn, hooks)
        if lw.ln2_post is not None:  # Gemma, OLMo 2: the MLP's output is normed before it joins the stream
            mlp = self._norm(mlp, lw.ln2_post, f"{name}.ln2_post", hooks)
        x = x + self._fire(hooks, f"{name}.hook_mlp_out", mlp)
        return self._fire(hooks, f"{name}.hook_resid_post", x)

    def _parallel_block(
        self,
        layer: int,
        x: torch.Tensor,
        qpos: torch.Tensor,
        prefix: KVPrefix | None,
        hooks: HookFns | None,
        *,
        keep_kv: list | None = None,
        keep_resid: dict | None = None,
    ) -> torch.Tensor:
        """GPT-NeoX / GPT-J block: ``resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))`` (GPT-J: ln2 = ln1)."""
        lw = self.layers[layer]
        name = f"blocks.{layer}"
        x = self._fire(hooks, f"{name}.hook_resid_pre", x)
        if keep_resid is not None:
            keep_resid[(layer, 0)] = x
        xa = self._norm(x, lw.ln1, f"{name}.ln1", hooks)
        attn = self._fire(hooks, f"{name}.hook_attn_out", self._attention(layer, xa, qpos, prefix, hooks, keep_kv))
        xm = xa if lw.ln2 is None else self._norm(x, lw.ln2, f"{name}.ln2", hooks)
        mlp = self._fire(hooks, f"{name}.hook_mlp_out", self._mlp(layer, xm, hooks))
        # HF's order of the sum (GPT-NeoX: mlp + attn + resid)
        return self._fire(hooks, f"{name}.hook_resid_post", mlp + attn + x)

    # ------------------------------------------------------------------------------------------------------------
    # passes

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor, hooks: HookFns | None = None) -> torch.Tensor:
        """Residual stream entering block 0: ``[B, 1, S, d_model]`` from tokens and absolute positions ``[B, S]``."""
        x = self.W_E[tokens][:, None]
        if self.embed_scale is not None:  # in the weights' dtype, as Hugging Face's Gemma does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        x = self._fire(hooks, "hook_embed", x)
        if self.W_pos is not None:
            x = x + self._fire(hooks, "hook_pos_embed", self.W_pos[pos][:, None])
        return x

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        hooks: HookFns | None = None,
        *,
        stop_after: tuple[int, int] | None = None,
        keep_kv: list | None = None,
        keep_resid: dict | None = None,
    ) -> torch.Tensor:
        """Every position of right-padded token rows: the residual stream after the last block run.

        Args:
            tokens: int64 ``[B, S]`` (right padding never changes a real position: attention is causal).
            hooks: hook name -> functions (see the module docstring for the layout).
            stop_after: ``(layer, sub)``: stop once that half-block has run (no later block, no final norm).
            keep_kv: a list that receives ``(keys, values)`` per block run (``[B, 1, S, n_kv, d_head]``, keys rotated).
            keep_resid: a dict that receives ``{(layer, 0): resid_pre, (layer, 1): resid_mid}`` ``[B, F, S, d]``.

        Returns:
            ``[B, F, S, d_model]``: the residual stream entering the final norm (or after ``stop_after``).
        """
        B, S = tokens.shape
        pos = torch.arange(S, device=tokens.device).expand(B, S)
        x = self.embed(tokens, pos, hooks)
        return self.forward_resid(x, pos, None, hooks, start=(0, 0), stop_after=stop_after, keep_kv=keep_kv,
                                  keep_resid=keep_resid)

    def forward_resid(
        self,
        x: torch.Tensor,
        qpos: torch.Tensor,
        prefixes: Sequence[KVPrefix] | None,
        hooks: HookFns | None = None,
        *,
        start: tuple[int, int] = (0, 0),
        stop_after: tuple[int, int] | None = None,
        keep_kv: list | None = None,
        keep_resid: dict | None = None,
        last_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run from half-block ``start`` with the residual stream ``x [B, F, S, d_model]`` at positions ``qpos [B, S]``.

        Args:
            prefixes: per layer, the cached keys/values of earlier positions (None: the positions in ``x`` are the
                whole sequence).
            start: ``(layer, 0)`` starts at block ``layer``'s ``hook_resid_pre``; ``(layer, 1)`` at its
                ``hook_resid_mid`` (attention skipped); ``(n_layers, 0)`` runs nothing.
            last_positions: int64 ``[S']`` indices into ``S`` (increasing): the last block computes its queries,
                attention output and MLP half at those positions only (its keys and values at every position), and
                the result is ``[B, F, S', d_model]``: nothing after the last attention mixes positions, so the
                others are not needed to read these. Hooks of the last block from ``hook_q`` on see ``S'``
                positions. Raises EngineError for a parallel block or a ``hook_pattern`` there.
        """
        layer, sub = start
        while layer < self.n_layers:
            if stop_after is not None and (layer, sub) > stop_after:
                return x
            prefix = None if prefixes is None else prefixes[layer]
            keep = last_positions if layer == self.n_layers - 1 else None
            x = self._block(layer, x, qpos, prefix, hooks, start_sub=sub, keep_kv=keep_kv, keep_resid=keep_resid,
                            keep=keep)
            if stop_after is not None and stop_after[0] == layer:
                return x
            layer, sub = layer + 1, 0
        return x

    def logits(self, resid: torch.Tensor, hooks: HookFns | None = None) -> torch.Tensor:
        """Final norm and unembedding of a residual stream ``[..., d_model]`` -> logits ``[..., d_vocab]`` (float32)."""
        xn = self._norm(resid, self.ln_final, "ln_final", hooks)
        flat = xn.reshape(-1, xn.shape[-1])
        # addmm adds the bias inside the matmul: a third faster than `@` then `+` with a large vocabulary
        out = torch.addmm(self.b_U.to(flat.dtype), flat, self.W_U) if self.b_U is not None else flat @ self.W_U
        if self.logit_softcap is not None:  # Gemma: what the model outputs is the capped logit
            out = _softcap(out, float(self.logit_softcap))
        return out.reshape(*xn.shape[:-1], -1).float()

    def losses(self, resid: torch.Tensor, targets: torch.Tensor, max_floats: int = UNEMBED_CHUNK_FLOATS
               ) -> torch.Tensor:
        """``-log p(target)`` (nats) of each row of the residual stream entering the final norm.

        Args:
            resid: ``[N, d_model]``.
            targets: int64 ``[N]`` token ids.
            max_floats: most logits held at once (:data:`UNEMBED_CHUNK_FLOATS`): rows are unembedded in chunks of
                ``max_floats // d_vocab``, so no ``[N, d_vocab]`` tensor is built for large ``N``.

        Returns:
            float32 ``[N]`` on ``resid``'s device.
        """
        targets = targets.reshape(-1, 1).to(resid.device)
        out = torch.empty(resid.shape[0], device=resid.device)
        step = max(1, max_floats // self.d_vocab)
        for i in range(0, resid.shape[0], step):
            lg = self.logits(resid[i : i + step])
            # log_softmax then gather, as the circuit's metric: ~2-3x faster per row on CPU than logsumexp minus
            # the target's logit (50,257 logits, 2 threads), the same value up to float rounding
            out[i : i + step] = -lg.log_softmax(-1).gather(-1, targets[i : i + step])[:, 0]
        return out

    def next_token_losses(self, resid: torch.Tensor, tokens: torch.Tensor,
                          max_floats: int = UNEMBED_CHUNK_FLOATS) -> torch.Tensor:
        """Next-token losses ``-log p(tokens[:, t + 1])`` (nats) from the residual stream entering the final norm
        (:meth:`losses` of every position but the last).

        Args:
            resid: ``[B, T, d_model]`` (every position of ``tokens``).
            tokens: int64 ``[B, T]``.
            max_floats: as :meth:`losses`.

        Returns:
            float32 ``[B, T - 1]`` (position ``t`` scores ``tokens[:, t + 1]``; the caller masks padding).
        """
        B, T = tokens.shape
        out = self.losses(resid[:, :-1].reshape(-1, resid.shape[-1]), tokens[:, 1:], max_floats)
        return out.reshape(B, T - 1)


