"""Hugging Face names for the hybrid's weights: TorchTitan's llama3 adapter, plus the linear layers.

`HybridStateDictAdapter` is the train spec's `state_dict_adapter`, so TorchTitan's
`checkpoint.initial_load_path` + `checkpoint.initial_load_in_hf` start a `llama3_mixed` model
from a Hugging Face Llama folder (docs/hf.md, "Import / linearize"), and
`checkpoint.last_save_in_hf` / `python -m titan_linear.export.hf` write one.

- Every layer, linear or softmax, has llama3's `wq/wk/wv/wo`, so each maps to the same HF name
  (`model.layers.N.self_attn.q_proj`, ...) with the RoPE row permutation of wq/wk that the llama3
  adapter applies. A linear layer does not use RoPE, and its output does not depend on the order
  of the features within a head as long as q and k share it (softmax over features, one weight
  per feature), so the permutation is harmless there and keeps one rule for all layers.
- The linear layers' options (linear_options.py) get names of their own under `self_attn`
  (`OPTION_NAMES`); the short convolution's q/k kernels, and the decay's rates when there is one
  per key feature, are permuted with the rows of wq/wk.
- The layer-map buffers (`linear_layer_map`, OELM's `oelm_freeze_map`) have no HF tensor: an
  export records them in config.json, an import keeps the model's own.

Loading (TorchTitan's CheckpointManager calls `to_hf`, then `get_hf_storage_reader`, then loads
and calls `from_hf`): before anything is read, the folder's safetensors headers are compared
with what the model asks for. A missing llama3 tensor, a tensor of another shape, or a tensor the
model has no place for stops the run with one line naming it; a missing option tensor (a plain
Llama has none) leaves that option at its initial value, with a log line. A folder whose
config.json ties the embeddings (no `lm_head.weight`) fills `output.weight` from
`model.embed_tokens.weight`. Its config.json's RoPE and norm settings must equal the model's.
"""

import json
import os
import re
import struct
from typing import Any

from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.tools.logging import logger

# TorchTitan name (after "layers.N.") -> HF name (after "model.layers.N.") of the options' tensors.
OPTION_NAMES = {
    "attention.q_log_scale": "self_attn.q_log_scale",
    "attention.k_log_scale": "self_attn.k_log_scale",
    "attention.k_log_decay": "self_attn.k_log_decay",
    "attention.short_conv.q_weight": "self_attn.short_conv.q_weight",
    "attention.short_conv.k_weight": "self_attn.short_conv.k_weight",
    "attention.short_conv.v_weight": "self_attn.short_conv.v_weight",
    "attention.out_norm.weight": "self_attn.out_norm.weight",
    "attention.wg.weight": "self_attn.g_proj.weight",
}
# HF tensors a Llama folder may hold that no model weight stands for.
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def ffn_hidden_dim(args) -> int:
    """The SwiGLU hidden width llama3's FeedForward builds from the model args (HF intermediate_size)."""
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def rope_parameters(args) -> dict:
    """The model's RoPE as HF's `rope_parameters` (TorchTitan 0.2.2 always applies llama3 scaling)."""
    s = args.rope_scaling_args
    return {
        "rope_type": "llama3", "rope_theta": float(args.rope_theta), "factor": float(s.scaling_factor),
        "low_freq_factor": float(s.low_freq_factor), "high_freq_factor": float(s.high_freq_factor),
        "original_max_position_embeddings": int(s.original_max_position_embeddings),
    }


def safetensors_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the folder's *.safetensors files (headers only)."""
    shapes = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


class HybridStateDictAdapter(Llama3StateDictAdapter):
    """TorchTitan <-> Hugging Face names for llama3_mixed (and the export of llama3_oelm).

    Args:
        model_args: the model's HybridModelArgs (or OELMModelArgs).
        hf_assets_path: `model.hf_assets_path`; "builtin", "" or a hub id (no local folder)
            count as none.
    """

    def __init__(self, model_args, hf_assets_path: str | None):
        if not hf_assets_path or not os.path.isdir(hf_assets_path):
            hf_assets_path = None
        super().__init__(model_args, hf_assets_path)
        self.maps = set(model_args.checkpoint_maps()) if hasattr(model_args, "checkpoint_maps") else set()
        self._requested: dict[str, Any] | None = None
        self._tied = False  # set by check_folder: the folder ties lm_head to the embeddings

    @staticmethod
    def _option(key: str) -> tuple[str, str] | None:
        """(layer number, TorchTitan suffix) of an option tensor's name, else None."""
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        return (m.group(1), m.group(2)) if m and m.group(2) in OPTION_NAMES else None

    def _kv_heads(self) -> int:
        return self.model_args.n_kv_heads or self.model_args.n_heads

    def _permuted_heads(self, suffix: str, value) -> int | None:
        """Heads whose rows an option tensor shares with wq or wk, so it takes their RoPE row
        permutation: the short convolution's q/k kernels, and the decay's rates when there is one
        per key feature (more than one per kv head). None: not permuted."""
        if suffix == "attention.k_log_decay":
            return self._kv_heads() if value.shape[0] > self._kv_heads() else None
        return {"attention.short_conv.q_weight": self.model_args.n_heads,
                "attention.short_conv.k_weight": self._kv_heads()}.get(suffix)

    def _rows(self, value, heads: int, reverse: bool):
        """The (reverse) permutation of a tensor's rows; a 1-D tensor as a column."""
        flat = value.dim() == 1
        x = value[:, None] if flat else value
        x = self._reverse_permute(x, heads) if reverse else self._permute(x, heads)
        return x[:, 0] if flat else x

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        core = {k: v for k, v in state_dict.items() if k not in self.maps and not self._option(k)}
        hf = super().to_hf(core)
        for key, value in state_dict.items():
            if (opt := self._option(key)) is None:
                continue
            layer, suffix = opt
            heads = self._permuted_heads(suffix, value)
            hf[f"model.layers.{layer}.{OPTION_NAMES[suffix]}"] = value if heads is None else self._rows(value, heads, False)
        self._requested = hf
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        reverse = {v: k for k, v in OPTION_NAMES.items()}
        core, state = {}, {}
        for key, value in hf_state_dict.items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            if m and m.group(2) in reverse:
                suffix = reverse[m.group(2)]
                heads = self._permuted_heads(suffix, value)
                state[f"layers.{m.group(1)}.{suffix}"] = value if heads is None else self._rows(value, heads, True)
            else:
                core[key] = value
        state.update(super().from_hf(core))
        if "output.weight" not in state and self._tied and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False):
        if self._requested is not None:
            self.check_folder(path, self._requested)
        return super().get_hf_storage_reader(path, from_quantized)

    def check_folder(self, path: str, requested: dict[str, Any]) -> None:
        """Compare the HF folder at `path` with the tensors `requested` (HF names); drop from
        `requested` the option tensors the folder lacks (and lm_head when the folder ties it).
        Raises ValueError naming the first tensor or setting that does not match."""
        where = f"checkpoint.initial_load_path = {path!r}"
        self._check_config(path, where)
        have = safetensors_shapes(path)
        if not have:
            raise ValueError(f"{where} is not allowed: it holds no *.safetensors file")
        self._tied = False
        if "lm_head.weight" in requested and "lm_head.weight" not in have and self._config_tied(path):
            del requested["lm_head.weight"]
            self._tied = True
        for key in list(requested):
            shape = tuple(requested[key].shape)
            if key not in have:
                if re.fullmatch(r"model\.layers\.\d+\.(.+)", key) and key.split(".", 3)[3] in OPTION_NAMES.values():
                    logger.info(f"{key} is not in {path}: that linear-layer option keeps its initial value")
                    del requested[key]
                    continue
                raise ValueError(f"{where} is not allowed: it has no tensor {key!r} {shape} (check "
                                 "model.n_layers / dim / n_heads / n_kv_heads / vocab_size and the flavor)")
            if have[key] != shape:
                raise ValueError(f"{where} is not allowed: {key} is {have[key]} there and {shape} in this "
                                 "model (check model.n_layers / dim / n_heads / n_kv_heads / vocab_size and the flavor)")
        extra = sorted(k for k in have if k not in requested and not IGNORED_HF.fullmatch(k)
                       and not (self._tied and k == "lm_head.weight"))
        if extra:
            raise ValueError(f"{where} is not allowed: this model has no place for its tensor {extra[0]!r} "
                             f"{have[extra[0]]} ({len(extra)} such; more layers or biases than the config?)")

    @staticmethod
    def _read_config(path: str) -> dict:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            return {}
        with open(file, encoding="utf-8") as f:
            return json.load(f)

    def _config_tied(self, path: str) -> bool:
        return bool(self._read_config(path).get("tie_word_embeddings", False))

    def _check_config(self, path: str, where: str) -> None:
        """Refuse a folder whose config.json asks for other RoPE or norm settings than the model's."""
        cfg = self._read_config(path)
        if not cfg:
            return
        args = self.model_args
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        theirs = {"rope_theta": theta, "rms_norm_eps": cfg.get("rms_norm_eps")}
        mine = {"rope_theta": float(args.rope_theta), "rms_norm_eps": float(args.norm_eps)}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            ours = rope_parameters(args)
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                theirs[f"rope {k}"], mine[f"rope {k}"] = rope.get(k), ours[k]
        elif kind == "default":
            # No scaling there: the model's llama3 scaling must be the identity (factor 1).
            theirs["rope factor"], mine["rope factor"] = 1.0, float(args.rope_scaling_args.scaling_factor)
        else:
            raise ValueError(f"{where} is not allowed: its config.json rope_type {kind!r} is not one this "
                             "model computes (llama3 or default)")
        for k, v in theirs.items():
            if v is not None and float(v) != float(mine[k]):
                raise ValueError(f"{where} is not allowed: its config.json has {k} = {v} and this model "
                                 f"{mine[k]} (pick a flavor with the same RoPE and norm settings)")
