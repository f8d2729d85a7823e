"""Configuration: one small typed dataclass per stage, TOML files, command-line overrides, and presets.

Presets are points on one scaling dial, `depth` (the number of transformer blocks), as in nanochat:
width = depth × aspect, heads = width / head_dim, and the learning rate follows width (lr ∝ 1/width,
anchored at GPT-2 small's 6e-4 at width 768). Changing `--depth` on any preset rescales the rest:

    nanoforge presets                                  # the table
    nanoforge pretrain --data TOKENS --out OUT --preset cpu-tiny --depth 6

Precedence, lowest first: preset → TOML file → command-line flags (`--lr`, … or `--set key=value`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from nanoforge.errors import NanoforgeError
from nanoforge.model import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class PretrainConfig:
    """Model shape (from the depth dial) and the optimisation of `nanoforge pretrain`.

    `None` means "derived": from the preset, the depth dial, or the tokenizer (vocab size).
    """

    preset: str = "cpu-tiny"
    init: str | None = None  # continue from this model artifact (domain adaptation): its weights and shape
    # --- the model, derived from depth ---
    depth: int | None = None
    flavour: str | None = None
    aspect: int | None = None  # width per layer: n_embd = depth * aspect
    head_dim: int | None = None
    kv_groups: int | None = None  # query heads per key/value head (GQA); 1 = plain multi-head
    mlp_hidden: int | None = None
    qk_norm: bool | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None  # None: the flavour's default (gpt2 tied, llama untied)
    seq_len: int | None = None
    # --- optimisation ---
    batch_size: int | None = None  # sequences per micro-batch (per rank)
    batch_tokens: int | None = None  # global batch in tokens; accumulation = batch_tokens / (B·T·ranks)
    max_steps: int | None = None
    lr: float | None = None  # peak learning rate
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast); auto measures on CPU, bf16 on capable GPUs
    compile: bool | None = None  # torch.compile; None: on CUDA yes (it pays), on CPU no
    # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    device: str = "auto"  # auto | cpu | cuda
    # --- parallelism and memory (see train/distributed.py) ---
    parallel: str = "ddp"  # ddp | fsdp: how the ranks of a torchrun launch share the model
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # --- fault handling ---
    spike_factor: float = 3.0  # a loss above spike_factor × its running mean is a spike: step skipped (0: off)
    max_bad_steps: int = 3  # this many skipped steps in a row roll back to the last checkpoint…
    rollback_lr_factor: float = 0.5  # … and multiply the learning rate by this from then on
    max_time: str | None = None  # stop cleanly with a checkpoint after this long: seconds, "90m", "2h"
    profile: bool = False  # write a torch profiler trace of a few steps into OUT/profile/
    # --- bookkeeping ---
    eval_every: int | None = None
    eval_batches: int = 8
    sample_every: int | None = None
    sample_tokens: int = 64
    sample_prompts: list[str] = field(default_factory=lambda: [""])  # "" = unconditional
    ckpt_every: int | None = None
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    seed: int = 0


# The named points on the dial. Only the keys that differ from the derivation are given.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(  # ≈1.5 M parameters with a 4k vocabulary: learns in minutes on 2 CPU cores
        depth=4, aspect=32, head_dim=32, flavour="llama", kv_groups=1, seq_len=256,
        batch_size=32, batch_tokens=8192, max_steps=400, warmup_steps=40,
        eval_every=100, sample_every=200, ckpt_every=100, dtype="auto",
    ),
    "cpu-small": dict(  # ≈14 M parameters with an 8k vocabulary: an hour-scale CPU run
        depth=6, aspect=64, head_dim=64, flavour="llama", kv_groups=1, seq_len=512,
        batch_size=8, batch_tokens=16384, max_steps=3000, warmup_steps=100,
        eval_every=250, sample_every=1000, ckpt_every=250,
    ),
    # GPT-2 small (124 M): the nanoGPT reference run, on GPUs. Micro-batch 32 (18 GB at vocab 50257) ran 7%
    # faster than 16 (10 GB) on an H100; the global batch stays 524,288 tokens either way.
    "gpt2-124m": dict(
        depth=12, aspect=64, head_dim=64, flavour="gpt2", kv_groups=1, seq_len=1024,
        batch_size=32, batch_tokens=524288, max_steps=19073, warmup_steps=715, lr=6e-4,
        eval_every=250, sample_every=1000, ckpt_every=1000,
    ),
    "llama-1b": dict(  # Llama-3.2-1B shape (16 × 2048, GQA 32/8, SwiGLU 8192): multi-GPU
        depth=16, aspect=128, head_dim=64, flavour="llama", kv_groups=4, mlp_hidden=8192,
        rope_theta=500000.0, tie_embeddings=True, seq_len=2048, batch_size=8, batch_tokens=1048576, max_steps=20000,
        warmup_steps=2000, lr=3e-4, eval_every=500, sample_every=2000, ckpt_every=1000,
    ),
}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes that record CUDA graphs: each micro-batch must mark a new run of them, and FSDP cannot use them
CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """Fill every derived field from the preset and the depth dial; a clear error for unknown presets."""
    if cfg.preset not in PRESETS:
        raise NanoforgeError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    base = PRESETS[cfg.preset]
    out = dataclasses.replace(cfg)
    if out.init is not None:
        for name, value in init_shape(out.init).items():
            if getattr(out, name) is not None and getattr(out, name) != value:
                raise NanoforgeError(f"pretrain: --init {out.init} has {name}={value!r}, the config asks for "
                                     f"{getattr(out, name)!r} (the shape comes from the init model: drop it)")
            setattr(out, name, value)
    for f in fields(out):
        if getattr(out, f.name) is None and f.name in base:
            setattr(out, f.name, base[f.name])
    if out.qk_norm is None:
        out.qk_norm = False
    if out.rope_theta is None:
        out.rope_theta = 10000.0
    width = out.depth * out.aspect
    if out.lr is None or (cfg.depth is not None and cfg.lr is None):
        out.lr = round(6e-4 * 768 / width, 6)  # lr ∝ 1/width, GPT-2 small's 6e-4 at width 768
    for name in ("eval_every", "sample_every", "ckpt_every"):
        if getattr(out, name) is None:
            setattr(out, name, max(1, out.max_steps // 5))
    if out.warmup_steps is None:
        out.warmup_steps = max(1, out.max_steps // 20)
    if out.batch_tokens is None:
        out.batch_tokens = out.batch_size * out.seq_len
    for name in ("depth", "aspect", "head_dim", "seq_len", "batch_size", "batch_tokens", "max_steps"):
        if getattr(out, name) <= 0:
            raise NanoforgeError(f"pretrain: {name} must be positive, got {getattr(out, name)}")
    if width % out.head_dim:
        raise NanoforgeError(f"pretrain: width {width} (depth×aspect) is not a multiple of head_dim "
                             f"{out.head_dim}")
    if out.schedule not in ("cosine", "wsd"):
        raise NanoforgeError(f"pretrain: schedule must be 'cosine' or 'wsd', got {out.schedule!r}")
    if out.dtype not in ("auto", "fp32", "bf16"):
        raise NanoforgeError(f"pretrain: dtype must be auto, fp32 or bf16, got {out.dtype!r}")
    if out.compile_mode not in COMPILE_MODES:
        raise NanoforgeError(f"pretrain: compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                             f"got {out.compile_mode!r}")
    if out.parallel not in ("ddp", "fsdp"):
        raise NanoforgeError(f"pretrain: parallel must be ddp or fsdp, got {out.parallel!r}")
    if out.eval_every < 1 or out.ckpt_every < 1 or out.sample_every < 0 or not out.grad_clip > 0:
        raise NanoforgeError(f"pretrain: need eval_every >= 1, ckpt_every >= 1, sample_every >= 0 (0: no samples) "
                             f"and grad_clip > 0 (got {out.eval_every}, {out.ckpt_every}, {out.sample_every}, "
                             f"{out.grad_clip})")
    if out.spike_factor < 0 or out.max_bad_steps < 1 or not 0 < out.rollback_lr_factor <= 1:
        raise NanoforgeError(f"pretrain: need spike_factor >= 0, max_bad_steps >= 1 and 0 < rollback_lr_factor "
                             f"<= 1 (got {out.spike_factor}, {out.max_bad_steps}, {out.rollback_lr_factor})")
    if out.max_time is not None:
        parse_duration(out.max_time)  # refuse a malformed one now, not hours into the run
    return out


def init_shape(init: str) -> dict[str, Any]:
    """The shape settings that rebuild the model artifact `init` through `model_config` (for `--init`)."""
    from nanoforge.train.checkpoint import read_model_config

    m = read_model_config(Path(init))
    if m.n_embd % m.n_layer:
        raise NanoforgeError(f"pretrain: --init {init}: width {m.n_embd} is not a multiple of depth {m.n_layer}, "
                             f"so the depth dial cannot describe it")
    return dict(depth=m.n_layer, aspect=m.n_embd // m.n_layer, head_dim=m.head_dim, flavour=m.flavour,
                kv_groups=m.n_head // m.n_kv_head, mlp_hidden=m.mlp_hidden, qk_norm=m.qk_norm,
                rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, seq_len=m.seq_len)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float) -> float:
    """Seconds in `text`: a number of seconds, or a number with a unit s/m/h/d ("90m", "2h", "1.5d")."""
    raw = str(text).strip().lower()
    unit = _UNITS.get(raw[-1:], None)
    try:
        seconds = float(raw[:-1] if unit else raw) * (unit or 1)
    except ValueError:
        raise NanoforgeError(f"max_time: expected seconds or a duration like 90m, 2h, got {text!r}") from None
    if not seconds > 0:
        raise NanoforgeError(f"max_time: must be positive, got {text!r}")
    return seconds


def model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The ModelConfig a resolved PretrainConfig describes; vocab padded to a multiple of 64 for speed."""
    width = cfg.depth * cfg.aspect
    n_head = width // cfg.head_dim
    if n_head % cfg.kv_groups:
        raise NanoforgeError(f"pretrain: {n_head} heads are not divisible by kv_groups={cfg.kv_groups}")
    return ModelConfig(
        flavour=cfg.flavour, vocab_size=int(math.ceil(vocab_size / 64) * 64), seq_len=cfg.seq_len,
        n_layer=cfg.depth, n_embd=width, n_head=n_head, n_kv_head=n_head // cfg.kv_groups,
        mlp_hidden=cfg.mlp_hidden, qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta,
        tie_embeddings=cfg.tie_embeddings,
    )


# ---------------------------------------------------------------------------------------------------
# TOML and overrides


def load_toml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoforgeError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise NanoforgeError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:  # a directory, a file we may not read, …
        raise NanoforgeError(f"{path}: cannot read the config file ({e.strerror or e})") from None


def _scalar(text: str) -> Any:
    """A command-line value whose type no annotation gives (a `dict[str, Any]` entry): a number or true/false
    where it reads as one, else the text."""
    text = text.strip()
    number = _number(text)
    if number is not None:
        return number
    return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(text: str, name: str) -> dict[str, Any]:
    """`K=V,K=V` (a dict setting given on the command line) → {K: V}, numbers where they look like numbers."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise NanoforgeError(f"{name}: expected KEY=VALUE pairs separated by commas, got {text!r}")
        out[key.strip()] = _scalar(value)
    return out


def _convert(hint: Any, value: Any, name: str) -> Any:
    """`value` (from TOML, or text from the command line) as type `hint`; a clear error naming `name` when it
    is not one. A number where text is expected is taken as its text (`max_time = 3600`)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if len(options) < len(args) and (value is None or isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, value, name)
            except NanoforgeError as e:
                errors.append(str(e))
        raise NanoforgeError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {hint}")
    if hint is Any or hint is object or (origin is None and not isinstance(hint, type)):
        return value  # nothing to check against
    got = f"got {value!r}"
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise NanoforgeError(f"{name}: expected true/false, {got}")
    if hint is int:
        number = _number(value)
        if number is None or not float(number).is_integer():
            raise NanoforgeError(f"{name}: expected an integer, {got}")
        return int(number)
    if hint is float:
        number = _number(value)
        if number is None:
            raise NanoforgeError(f"{name}: expected a number, {got}")
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, os.PathLike)) and not isinstance(value, bool):
            return str(value)
        raise NanoforgeError(f"{name}: expected a string, {got}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise NanoforgeError(f"{name}: expected a list, {got}")
        item = args[0] if args else Any
        return [_convert(item, v, name) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = _pairs(value, name)
        if not isinstance(value, dict):
            raise NanoforgeError(f"{name}: expected a table (KEY=VALUE,… on the command line), {got}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _convert(item, v, f"{name}.{k}") for k, v in value.items()}
    return value


def _number(value: Any) -> int | float | None:
    """An int or float from a number or its text; None for anything else (a bool is not a number here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a TOML or command-line value to the annotated type of `cls.name`."""
    return _convert(get_type_hints(cls)[name], value, name)


def _nest(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Dotted keys (`options.language.threshold` from `--set clean.options.language.threshold=0.4`) set one entry
    of a table setting, on top of the table the file gives (or the default); their text values become numbers or
    true/false where they look like them, as nothing annotates them."""
    out = {k: v for k, v in values.items() if "." not in k}
    defaults = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if "." not in key:
            continue
        head, *path, leaf = key.split(".")
        if head not in out and head in defaults:
            f = defaults[head]
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[head] = base if isinstance(base, dict) else {}
        node, seen = out, []
        for part in [head, *path]:
            seen.append(part)
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise NanoforgeError(f"{where}: {key}: {'.'.join(seen)} is not a table")
            node[part] = child = dict(child)  # a copy: the TOML's own tables stay as they were read
            node = child
        node[leaf] = _scalar(value) if isinstance(value, str) else value
    return out


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `values`, refusing unknown keys and values of the wrong type with a
    clear message."""
    if not isinstance(values, dict):
        raise NanoforgeError(f"{where}: expected a table of settings, got {values!r}")
    values = _nest(cls, values, where)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise NanoforgeError(f"{where}: unknown setting(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
    try:
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    except NanoforgeError as e:
        raise NanoforgeError(f"{where}: {e}") from None


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs → dict (values stay strings and are coerced by `build`)."""
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise NanoforgeError(f"--set {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out
