"""Profiles: named settings per use case (issue 7), from a catalog entry's [profiles.NAME] tables.

    [profiles.summarize]
    description = "prune at 0.9: measured continuation perplexity x1.28, greedy agreement 0.73 ..."
    mode = "prune"        # exact | prune
    active = 0.9          # as --active: a fraction, parameters ("300M") or "auto[:T]"; omitted: the largest that fits
    reselect = 0          # as --reselect
    ctx = 8192            # optional: as --ctx

`fic run/chat/serve/bench MODEL --profile NAME` takes a profile's values; flags given on the command
line override them. A model finds its profiles in the catalog entry named as its store name (a
pulled catalog model), else it gets DEFAULTS (a model converted from a local file). Every quality
figure a description states comes from bench/RESULTS.md; a profile promises no more than that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flashinfer_cli.catalog import CatalogError

MODES = ("exact", "prune")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_KEYS = {"description", "mode", "active", "reselect", "ctx"}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str            # one line for `fic show`: what it is for, and what it costs (measured)
    mode: str = "exact"
    active: str | None = None   # as --active; None: the largest that fits
    reselect: int = 0
    ctx: int | None = None

    def summary(self) -> str:
        """The values in a few words, as `fic show` and --verbose print them."""
        parts = [f"{self.mode} mode"]
        if self.active is not None:
            parts.append(f"active {self.active}")
        parts.append(f"reselect {self.reselect}" if self.reselect else "no reselection")
        if self.ctx is not None:
            parts.append(f"ctx {self.ctx}")
        return ", ".join(parts)

    def options(self) -> dict[str, Any]:
        """The engine options and --ctx this profile sets (the CLI's names)."""
        return {"mode": self.mode, "active": self.active, "reselect": self.reselect, "ctx": self.ctx}


def _int(raw: dict, key: str, where: str, low: int) -> int | None:
    v = raw.get(key)
    if v is None:
        return None
    if type(v) is not int or v < low:
        raise CatalogError(f"{where}: {key} must be an integer >= {low}, got {v!r}")
    return v


def parse_profile(name: str, raw: Any, where: str) -> Profile:
    """One [profiles.NAME] table; CatalogError (one line) for anything wrong."""
    from flashinfer_cli import plan

    where = f"{where} profile {name!r}"
    if not _NAME.match(name):
        raise CatalogError(f"{where}: a profile name is lowercase letters, digits, - and _ (at most 32)")
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: not a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r} (a profile has: {', '.join(sorted(_KEYS))})")
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip() or "\n" in desc:
        raise CatalogError(f"{where}: description must be one non-empty line")
    mode = raw.get("mode", "exact")
    if mode not in MODES:
        raise CatalogError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
    active = raw.get("active")
    if active is not None:
        if isinstance(active, bool) or not isinstance(active, (int, float, str)):
            raise CatalogError(f"{where}: active must be a fraction, a parameter count (\"300M\") or \"auto[:T]\"")
        try:
            parsed = plan.parse_active(str(active))  # a number is checked as the flag would be
        except ValueError as exc:
            raise CatalogError(f"{where}: {exc}") from None
        if isinstance(parsed, plan.AutoActive) and mode != "prune":
            raise CatalogError(f"{where}: active {active!r} needs mode = \"prune\"")
        active = str(active)
    return Profile(name=name, description=desc.strip(), mode=mode, active=active,
                   reselect=_int(raw, "reselect", where, 0) or 0, ctx=_int(raw, "ctx", where, 1))


def parse_table(raw: Any, where: str) -> dict[str, Profile]:
    """A catalog entry's [profiles] table (absent: none), in the file's order."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: profiles must be a table of [profiles.NAME] tables")
    return {name: parse_profile(name, value, where) for name, value in raw.items()}


# For a model no catalog entry describes (converted from a local file). The quality cost of pruning
# depends on the model and was not measured for it: the prune profile says what it cost on the
# catalog's models (bench/RESULTS.md, "Prune-mode quality vs expert size": exact policy at 0.9,
# expert size 64: x1.283 on SmolLM2-135M, x1.265 on Qwen2.5-Coder-0.5B; at 0.75: x3.04 and x1.95;
# "ffn_down's format per layer", the catalog's Qwen conversions at 256: x1.267 (0.5B), x1.234 (1.5B)).
DEFAULTS: dict[str, Profile] = {p.name: p for p in (
    Profile("chat", "the full model's answer: no quality cost"),
    Profile("code", "the full model's answer: code needs every token right"),
    Profile("summarize", "not measured for this model; on the catalog's models 0.9 cost "
                         "continuation perplexity x1.23-1.28 (0.75: x1.9-3.0)", mode="prune", active="0.9"),
    Profile("long", "the full model's answer with an 8192-token context (the model's own if smaller)",
            ctx=8192),
)}


def for_model(store_name: str) -> dict[str, Profile]:
    """The profiles of a model by its store name: its catalog entry's when there is one and it
    has profiles, else DEFAULTS. A broken catalog entry raises CatalogError."""
    from flashinfer_cli import catalog

    if catalog.has(store_name):
        found = catalog.get(store_name).profiles
        if found:
            return found
    return dict(DEFAULTS)


def get(store_name: str, name: str) -> Profile:
    """One profile of a model; CatalogError (one line, naming the model's profiles) if it has none
    of that name."""
    found = for_model(store_name)
    if name not in found:
        raise CatalogError(f"model {store_name!r} has no profile {name!r} (its profiles: {', '.join(found)})")
    return found[name]
