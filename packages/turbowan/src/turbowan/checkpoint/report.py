"""Compare a checkpoint's tensors with what a preset expects, and say what the file looks like.

Used by `turbowan check`, by ``load_dit`` when a file does not fit the model, and by the
pipeline's pre-flight checks. Only key names, shapes and dtypes are read (safetensors header
or a memory-mapped `.pth`), so checking a 28 GB file costs no RAM and little time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from turbowan.checkpoint.io import TensorSpec, read_tensor_specs

SHOW = 10  # how many keys of each kind a report lists
NORM_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")
DIT_FAMILY = "turbowan.dit.meta"
# option combinations to try per family when the module does not list its own
DEFAULT_VARIANTS: dict[str, list[dict[str, str]]] = {
    "turbowan.text_encoder.meta": [{"naming": "wan"}, {"naming": "comfy"}],
}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys, shapes or dtypes do not fit the model; ``.report`` says how."""

    def __init__(self, report: MismatchReport) -> None:
        super().__init__(report.format())
        self.report = report


@dataclass
class MismatchReport:
    """Differences between the tensors a file holds and those a model expects."""

    source: str
    expected_label: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    wrong_dtype: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)
    cast_dtype: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    looks_like: str | None = None
    fix: str | None = None
    num_expected: int = 0
    num_found: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def summary(self) -> str:
        return (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.wrong_shape)} wrong shape, {len(self.wrong_dtype)} wrong dtype"
        )

    def format(self, limit: int = SHOW) -> str:
        state = "matches" if self.ok else "does NOT match"
        lines = [
            f"{self.source}: {state} {self.expected_label} "
            f"({self.num_found} tensors in file, {self.num_expected} expected)"
        ]
        if not self.ok:
            lines.append("  " + self.summary())

        def section(title: str, rows: list[str], total: int) -> None:
            if not total:
                return
            more = f" (first {limit} of {total})" if total > limit else ""
            lines.append(f"  {title}{more}:")
            lines.extend(f"    {row}" for row in rows[:limit])

        section("missing keys", self.missing, len(self.missing))
        section("unexpected keys", self.unexpected, len(self.unexpected))
        section(
            "wrong shape (expected -> in file)",
            [f"{k}: {list(e)} -> {list(f)}" for k, e, f in self.wrong_shape],
            len(self.wrong_shape),
        )
        section(
            "wrong dtype (expected -> in file)",
            [f"{k}: {_dt(e)} -> {_dt(f)}" for k, e, f in self.wrong_dtype],
            len(self.wrong_dtype),
        )
        if self.cast_dtype:
            lines.append(
                f"  note: {len(self.cast_dtype)} floating tensors differ in dtype from the "
                f"reference layout and will be cast on load (e.g. {self.cast_dtype[0][0]}: "
                f"{_dt(self.cast_dtype[0][1])} -> {_dt(self.cast_dtype[0][2])})"
            )
        if self.ignored:
            lines.append(
                f"  note: {len(self.ignored)} keys are accepted and ignored "
                f"(e.g. {self.ignored[0]}; SLA proj_l is unused with attention='original')"
            )
        if self.looks_like:
            lines.append(f"  the file looks like: {self.looks_like}")
        if not self.ok:
            fix = self.fix or (
                "pass the preset/options the file was made for (`turbowan check FILE` without "
                "--preset detects them), or re-download the file if it is damaged"
            )
            lines.append(f"  fix: {fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "expected": self.expected_label,
            "ok": self.ok,
            "looks_like": self.looks_like,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "wrong_shape": [[k, list(e), list(f)] for k, e, f in self.wrong_shape],
            "wrong_dtype": [[k, _dt(e), _dt(f)] for k, e, f in self.wrong_dtype],
            "cast_dtype": len(self.cast_dtype),
            "ignored": len(self.ignored),
        }


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _castable(expected: torch.dtype, found: torch.dtype) -> bool:
    return expected.is_floating_point and found.is_floating_point


def compare_specs(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    source: str,
    expected_label: str,
    ignore: Callable[[str], bool] | None = None,
) -> MismatchReport:
    """Key-by-key comparison; ``expected``/``found`` map key -> object with shape and dtype.

    Floating dtype differences are castable (noted, not errors); norm weights may be fp32
    or bf16 without a note, as the real files store them fp32.
    """
    report = MismatchReport(
        source=source,
        expected_label=expected_label,
        num_expected=len(expected),
        num_found=len(found),
    )
    for key in expected:
        if key not in found:
            report.missing.append(key)
    for key, spec in found.items():
        if key not in expected:
            if ignore is not None and ignore(key):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
            continue
        want = expected[key]
        if tuple(spec.shape) != tuple(want.shape):
            report.wrong_shape.append((key, tuple(want.shape), tuple(spec.shape)))
        elif spec.dtype != want.dtype:
            if not _castable(want.dtype, spec.dtype):
                report.wrong_dtype.append((key, want.dtype, spec.dtype))
            elif not (
                key.endswith(NORM_SUFFIXES) and spec.dtype in (torch.float32, torch.bfloat16)
            ):
                report.cast_dtype.append((key, want.dtype, spec.dtype))
    return report


def module_specs(model: torch.nn.Module) -> dict[str, TensorSpec]:
    """Key -> shape/dtype of a model's state dict (works on ``meta``)."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def expected_specs(preset: str, **options: str) -> dict[str, TensorSpec]:
    """The manifest of ``preset`` built on meta, through the family module of presets.py."""
    from turbowan.presets import family_module

    module = family_module(preset)
    try:
        model = module.build_manifest_model(preset, **options)
    except TypeError as exc:
        raise ValueError(
            f"preset {preset!r} does not take the options {sorted(options)} ({exc})"
        ) from exc
    return module_specs(model)


def _option_label(preset: str, options: Mapping[str, str]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"preset {preset!r}" + (f" ({opts})" if opts else "")


def _family_variants(module_name: str, module: Any) -> list[dict[str, str]]:
    return list(getattr(module, "OPTION_VARIANTS", DEFAULT_VARIANTS.get(module_name, [{}])))


def _score(report: MismatchReport) -> tuple[int, int]:
    return (
        len(report.missing) + len(report.unexpected) + len(report.wrong_shape),
        len(report.wrong_dtype),
    )


def _dit_ignore(options: Mapping[str, str]) -> Callable[[str], bool] | None:
    from turbowan.dit.config import PROJ_L

    if options.get("attention") == "original":
        return lambda key: PROJ_L in key
    return None


def _detect_dit(found: Mapping[str, Any]) -> Any | None:
    from turbowan.dit.config import config_from_state_dict
    from turbowan.limits import OutOfBoundsError

    try:
        return config_from_state_dict(found)
    except OutOfBoundsError:
        raise  # a DiT with impossible sizes: say so, do not look for another family
    except ValueError:
        return None


def describe_specs(found: Mapping[str, Any]) -> str:
    """A one-line guess of what the file is: preset, quantisation, attention (or naming)."""
    layout = _detect_dit(found)
    if layout is not None:
        return layout.describe()
    return _describe_match(_best_non_dit_match(found, source=""))


def _describe_match(best: tuple[str, dict[str, str], MismatchReport] | None) -> str:
    if best is None:
        return "nothing turbowan knows (no DiT, VAE or text-encoder preset is close)"
    preset, options, report = best
    label = _option_label(preset, options)
    if report.ok:
        return label
    return f"closest is {label} ({report.summary()})"


def _family_keys(module: Any, found: Mapping[str, Any]) -> Mapping[str, Any]:
    """Let a family drop its wrapper prefixes (e.g. ComfyUI's ``first_stage_model.``) first.

    A family module may define ``normalize_checkpoint_keys(specs) -> specs``; its loader
    accepts those prefixes, so the header check must too.
    """
    normalize = getattr(module, "normalize_checkpoint_keys", None)
    return normalize(found) if normalize is not None else found


def _best_non_dit_match(
    found: Mapping[str, Any], *, source: str
) -> tuple[str, dict[str, str], MismatchReport] | None:
    import importlib

    from turbowan.presets import PRESET_FAMILIES

    best: tuple[str, dict[str, str], MismatchReport] | None = None
    for preset, module_name in sorted(PRESET_FAMILIES.items()):
        if module_name == DIT_FAMILY:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # that family is not installed / not written yet
        for options in _family_variants(module_name, module):
            try:
                expected = module_specs(module.build_manifest_model(preset, **options))
            except Exception:  # a family that cannot build this variant is simply not a match
                continue
            report = compare_specs(
                expected,
                _family_keys(module, found),
                source=source,
                expected_label=_option_label(preset, options),
            )
            if best is None or _score(report) < _score(best[2]):
                best = (preset, dict(options), report)
    if best is not None and _score(best[2])[0] >= best[2].num_expected:
        return None  # nothing in common: not this family at all
    return best


def check_specs(
    found: Mapping[str, Any], *, source: str, preset: str | None = None, **options: str | None
) -> MismatchReport:
    """Check already-read specs against ``preset`` (or the best-matching preset when None).

    DiT options (``quant``, ``attention``) default to what the file holds, so a check with
    only a preset compares shapes; give them to insist on a layout.
    """
    from turbowan.dit.keys import normalize_dit_keys
    from turbowan.presets import PRESET_FAMILIES, family_module

    opts = {k: v for k, v in options.items() if v is not None}
    found, _prefix, _dropped = normalize_dit_keys(found)
    layout = _detect_dit(found)
    best = _best_non_dit_match(found, source=source) if layout is None else None
    looks_like = layout.describe() if layout is not None else _describe_match(best)
    if preset is None and layout is None:
        if best is None:
            report = MismatchReport(source=source, expected_label="any known preset")
            report.unexpected = list(found)
            report.num_found = len(found)
            report.looks_like = looks_like
            return report
        preset, found_opts, _ = best
        opts = {**found_opts, **opts}
    if preset is None or PRESET_FAMILIES.get(preset) == DIT_FAMILY:
        return _check_dit(
            found, source=source, preset=preset, layout=layout, options=opts, looks_like=looks_like
        )
    expected = expected_specs(preset, **opts)
    report = compare_specs(
        expected,
        _family_keys(family_module(preset), found),
        source=source,
        expected_label=_option_label(preset, opts),
    )
    report.looks_like = looks_like
    return report


def _check_dit(
    found: Mapping[str, Any],
    *,
    source: str,
    preset: str | None,
    layout: Any | None,
    options: dict[str, str],
    looks_like: str,
) -> MismatchReport:
    from turbowan.dit.meta import build_manifest_model

    extra = sorted(set(options) - {"quant", "attention"})
    if extra:
        raise ValueError(
            f"option(s) {', '.join(extra)} do not apply to a DiT preset; DiT options are "
            "quant and attention"
        )
    detected = (
        {"quant": layout.quant, "attention": layout.attention}
        if layout is not None
        else {"quant": "int8", "attention": "sla"}  # the published files' layout
    )
    options = {**detected, **options}
    if options.get("attention") == "sagesla":
        options["attention"] = "sla"  # same keys
    target: Any = preset
    label = _option_label(preset, options) if preset else ""
    if preset is None:
        assert layout is not None
        name = layout.preset_name()
        target = name or layout.config
        label = (
            _option_label(name, options)
            if name
            else f"the Wan DiT shape inferred from the file ({layout.describe()})"
        )
    expected = module_specs(build_manifest_model(target, **options))
    report = compare_specs(
        expected, found, source=source, expected_label=label, ignore=_dit_ignore(options)
    )
    report.looks_like = looks_like
    if layout is not None and not report.ok:
        name = layout.preset_name()
        if name is not None:
            report.fix = (
                f"the file is --preset {name} --quant {layout.quant} --attention "
                f"{layout.attention}; check or load it with those (load_dit detects them itself)"
            )
        else:
            report.fix = (
                "the file is a Wan DiT of a shape no preset has; omit --preset "
                "(load_dit infers the shape from the file)"
            )
    return report


def check_against_preset(
    path: str | os.PathLike[str], preset: str | None = None, **options: str | None
) -> MismatchReport:
    """Validate a checkpoint file from its header (or mmap) against ``preset``.

    Raises ``CheckpointReadError`` when the file cannot be read (missing, truncated,
    unsafe pickle); returns a report otherwise, whose ``ok`` says whether it matches.
    """
    specs = read_tensor_specs(path)
    return check_specs(specs, source=str(Path(path)), preset=preset, **options)
