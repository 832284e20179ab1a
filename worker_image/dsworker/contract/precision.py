"""Which linear modules a quantised checkpoint stores quantised, and which it keeps in float.

One decision for every user: the model builder gives a float module a BF16 weight, the memory
model and the synthesizer count and write it so, the sharder checks the tensors against it. Pure:
config.json and, where the checkpoint has one, msModelSlim's quant_model_description*.json (parsed
by the caller). The rules are those of the tools that write the lists (recorded with their sources
in tests/data/formats/quant_precision.json):

- compressed-tensors `quantization_config.ignore`, and the 8-bit group's `targets`: an exact module
  name, or `re:` and a regex matched from the start of the name (re.match); the target `Linear` is
  every linear module;
- `quantization_config.modules_to_not_convert` (transformers, FP8) and `ignored_layers` (vLLM):
  transformers' rule, a regex matching from the start up to a module boundary (so a parent module
  covers its children) or a suffix of the name;
- the msModelSlim description: `<module>.weight` (or `.weight_packed`) "FLOAT" is float, any other
  type quantised; a module it does not list is float (vllm-ascend: MTP layers are absent = FLOAT).
  Of a W8A8 checkpoint's quantised modules, those typed "W8A8" are static (per-tensor activation
  scale, W8A8_STATIC), the others ("W8A8_DYNAMIC") dynamic: msModelSlim's DeepSeek exports mix them
  (attention static, MLPs dynamic), and vllm-ascend picks each module's scheme so too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dsworker.contract.errors import CheckpointError
from dsworker.contract.model_config import ModelConfigError
from dsworker.contract.quant import W8A8, W8A8_STATIC, QuantFormat, quant_format

FLOAT = "FLOAT"  # msModelSlim's type of a tensor it left unquantised
STATIC = "W8A8"  # msModelSlim's type of a statically quantised module (vs "W8A8_DYNAMIC")
MODULE_LIST_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers")
# The last name part of the linear modules a DeepSeek checkpoint may store quantised (embeddings,
# heads, the router and MTP's eh_proj are always float here).
LINEAR_LEAVES = (
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # transformers' module boundary after a pattern


@dataclass(frozen=True)
class QuantDescription:
    """msModelSlim's quant_model_description*.json: the file (named in errors) and its entries."""

    file: str
    entries: Mapping[str, Any]


@dataclass(frozen=True)
class _Pattern:
    """One entry of a module list: where it came from (for messages) and its compiled rule."""

    where: str  # e.g. "quantization_config.ignore[1] 're:.*o_proj$'"
    regex: re.Pattern[str] | None  # None: an exact name
    text: str

    def matches(self, module: str) -> bool:
        return self.regex.match(module) is not None if self.regex else module == self.text


@dataclass(frozen=True)
class Precision:
    """The format config.json declares and the declarations that leave modules in float."""

    fmt: QuantFormat | None
    ignore: tuple[_Pattern, ...] = ()
    targets: tuple[_Pattern, ...] = ()  # empty: every linear module is a target
    not_convert: tuple[_Pattern, ...] = ()
    description: QuantDescription | None = None
    _seen: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def quantised(self, module: str) -> bool:
        """Whether the checkpoint stores `module`'s weight (name without `.weight`) quantised."""
        return self.fmt is not None and self.why_float(module) is None

    def format_of(self, module: str) -> QuantFormat | None:
        """The format `module` is stored in: None (float), config.json's, or for a W8A8 module
        the description types "W8A8", W8A8_STATIC."""
        if not self.quantised(module):
            return None
        assert self.fmt is not None
        if self.fmt.kind == W8A8 and self._described(module) == STATIC:
            return QuantFormat(W8A8_STATIC)
        return self.fmt

    def _described(self, module: str) -> Any:
        """msModelSlim's type of `module` (None: no description, or not listed)."""
        if self.description is None:
            return None
        d = self.description.entries
        return d.get(f"{module}.weight", d.get(f"{module}.weight_packed"))

    def why_float(self, module: str) -> str | None:
        """The declaration that keeps `module` in float, None when it is stored quantised."""
        if self.fmt is None:
            return "config.json declares no quantisation"
        if module not in self._seen:
            self._seen[module] = self._decide(module)
        return self._seen[module]

    def _decide(self, module: str) -> str | None:
        if self.targets and not any(p.matches(module) for p in self.targets):
            return "no quantization_config.config_groups target matches it"
        for p in (*self.ignore, *self.not_convert):
            if p.matches(module):
                return p.where
        if self.description is not None:
            kind, file = self._described(module), self.description.file
            if kind is None:
                return f"{file} does not list {module}.weight (unlisted modules are FLOAT)"
            if kind == FLOAT:
                return f'{file}: "{module}.weight": "FLOAT"'
        return None

    def stack_format(self, modules: Iterable[str], what: str) -> QuantFormat | None:
        """The one format of weights the model fuses into one tensor (gate and up, an expert
        stack); ModelConfigError naming them when the declarations split them."""
        names = list(modules)
        floats = [(m, why) for m in names if (why := self.why_float(m)) is not None]
        if self.fmt is None or len(floats) == len(names):
            return None
        if not floats:
            static = [m for m in names if self.format_of(m) == QuantFormat(W8A8_STATIC)]
            if static:
                raise ModelConfigError(static_unsupported(static[0], what), "quantization_config")
            return self.fmt
        m, why = floats[0]
        raise ModelConfigError(
            f"{what}: {len(floats)} of {len(names)} weights are left unquantised (e.g. {m}: "
            f"{why}) and the rest are {self.fmt.kind}; they are fused into one weight and take "
            "one precision: declare all of them unquantised or none",
            "quantization_config",
        )


def static_unsupported(module: str, what: str) -> str:
    """The refusal of a static W8A8 MLP weight (the model fuses gate/up and stacks experts, which
    share one input quantisation only when dynamic); msModelSlim quantises MLPs dynamically."""
    return (
        f'{what}: {module} is static W8A8 ("W8A8" in the msModelSlim description); static '
        "activation quantisation is served for attention projections only; re-export the MLPs "
        'as "W8A8_DYNAMIC" (msModelSlim\'s DeepSeek mix: *.mlp.* w8a8_dynamic)'
    )


def _list(qc: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = qc.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ModelConfigError(
            f"{where}: quantization_config.{key} must be a list of module names or 're:' "
            "patterns; fix config.json",
            f"quantization_config.{key}",
        )
    return v


def _compile(pattern: str, key: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ModelConfigError(
            f"{where}: {key} {pattern!r} is not a valid regular expression ({e}); fix config.json",
            key,
        ) from None


def _ct_patterns(items: list[str], key: str, where: str) -> tuple[_Pattern, ...]:
    """compressed-tensors entries: `re:` + regex (re.match), else an exact name."""
    out = []
    for i, s in enumerate(items):
        at = f"quantization_config.{key}[{i}] {s!r}"
        rx = _compile(s[3:], f"quantization_config.{key}[{i}]", where) if s[:3] == "re:" else None
        out.append(_Pattern(at, rx, s))
    return tuple(out)


def _hf_patterns(items: list[str], key: str, where: str) -> tuple[_Pattern, ...]:
    """transformers' modules_to_not_convert: a prefix regex up to a module boundary, or a suffix."""
    out = []
    for i, s in enumerate(items):
        rx = _compile(rf"(?:{s}){_BOUNDARY}|.*{re.escape(s)}$", f"{key}[{i}]", where)
        out.append(_Pattern(f"quantization_config.{key}[{i}] {s!r}", rx, s))
    return tuple(out)


def _targets(qc: Mapping[str, Any], where: str) -> tuple[_Pattern, ...]:
    """The 8-bit weight group's targets; `Linear` (or none given) means every linear module."""
    for name, group in (qc.get("config_groups") or {}).items():
        w = (group or {}).get("weights") or {}
        if w.get("num_bits") != 8 or group.get("input_activations"):
            continue  # not the weight-only 8-bit group quant_format reads
        targets = _list(group, "targets", where) if "targets" in group else ["Linear"]
        if "Linear" in targets:
            return ()
        return _ct_patterns(targets, f"config_groups.{name}.targets", where)
    return ()


def _check_description(d: QuantDescription) -> None:
    if not isinstance(d.entries, Mapping):
        raise CheckpointError(
            f"{d.file}: must be a JSON object of tensor name -> quantisation type; re-export it "
            "with msModelSlim or fix it"
        )
    for name, kind in d.entries.items():
        if name.endswith((".weight", ".weight_packed")) and not isinstance(kind, str):
            raise CheckpointError(
                f'{d.file}: "{name}" must be a quantisation type such as "W8A8_DYNAMIC" or '
                f'"FLOAT", got {type(kind).__name__}; fix the description file'
            )


def module_precision(
    cfg: Mapping[str, Any], description: QuantDescription | None = None, where: str = "config.json"
) -> Precision:
    """config.json's (and the description's) precision of each linear module.

    ModelConfigError names a malformed module list, CheckpointError a malformed description.
    """
    fmt = quant_format(dict(cfg))
    qc = cfg.get("quantization_config")
    qc = qc if isinstance(qc, Mapping) else {}
    if description is not None:
        _check_description(description)
    return Precision(
        fmt,
        ignore=_ct_patterns(_list(qc, "ignore", where), "ignore", where),
        targets=_targets(qc, where) if qc.get("quant_method") == "compressed-tensors" else (),
        not_convert=_hf_patterns(
            _list(qc, "modules_to_not_convert", where), "modules_to_not_convert", where
        )
        + _hf_patterns(_list(qc, "ignored_layers", where), "ignored_layers", where),
        description=description if fmt is not None else None,
    )


def matching(patterns: Iterable[str], modules: Iterable[str]) -> list[str]:
    """The modules a compressed-tensors-style list (exact names, `re:` regexes) names."""
    ps = _ct_patterns(list(patterns), "ignore", "patterns")
    return [m for m in modules if any(p.matches(m) for p in ps)]
