"""Generate the Python code for protos/ into the client package, or check it.

    python tools/gen_protos.py           # regenerate clients/python/sendtime/v1/
    python tools/gen_protos.py --check   # exit 1 if the committed code drifts

The generated modules live in the `sendtime.v1` namespace (the proto package),
so protoc's own absolute imports (`from sendtime.v1 import event_pb2`) work
without sys.path tricks. Stubs (.pyi) come from mypy-protobuf.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python"
PACKAGE_DIR = Path("sendtime") / "v1"


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            sys.exit(f"gen_protos: {name} not found; install mypy-protobuf")
        return found
    return str(path)


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("gen_protos: protoc failed")
    (out_root / PACKAGE_DIR / "py.typed").touch()


def _generated_files(root: Path) -> set[str]:
    return {p.name for p in (root / PACKAGE_DIR).iterdir() if p.name != "__pycache__"}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        (fresh / PACKAGE_DIR).mkdir(parents=True)
        generate(fresh)
        committed_dir = OUT_ROOT / PACKAGE_DIR
        fresh_names = _generated_files(fresh)
        committed_names = _generated_files(OUT_ROOT) if committed_dir.exists() else set()
        drift = sorted(fresh_names ^ committed_names)
        drift += sorted(
            name
            for name in fresh_names & committed_names
            if not filecmp.cmp(fresh / PACKAGE_DIR / name, committed_dir / name, shallow=False)
        )
    if drift:
        print("generated code drifts from protos/: " + ", ".join(drift), file=sys.stderr)
        print("run `make gen` and commit the result", file=sys.stderr)
        return 1
    print(f"generated code matches protos/ ({len(fresh_names)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if committed code drifts from protos/")
    if parser.parse_args().check:
        return check()
    target = OUT_ROOT / PACKAGE_DIR
    for old in target.glob("*_pb2*"):
        old.unlink()
    target.mkdir(parents=True, exist_ok=True)
    generate(OUT_ROOT)
    print(f"generated {len(_generated_files(OUT_ROOT))} files into {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
