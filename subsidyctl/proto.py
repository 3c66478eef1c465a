"""Generate the committed protobuf/gRPC code, or check that it is fresh.

`python -m subsidyctl.proto generate` writes subsidy/v1/*_pb2*.py(i) from proto/subsidy/v1;
`python -m subsidyctl.proto check` regenerates into a temporary folder and fails, naming the
stale files, if the committed code differs ("did you forget to run make proto?").
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("subsidy") / "v1"


def generate(out: Path) -> list[Path]:
    """Run protoc for every .proto into ``out``; return the generated files, relative."""
    from grpc_tools import protoc  # dev dependency: only needed to generate

    include = str(resources.files("grpc_tools") / "_proto")
    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    )
    bindir = Path(sys.executable).parent
    (out / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for init in (out / "subsidy" / "__init__.py", out / PACKAGE_DIR / "__init__.py"):
        init.write_text('"""Generated from proto/ by `make proto`; do not edit."""\n')
    return sorted(p.relative_to(out) for p in (out / "subsidy").rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "generate"
    if command == "generate":
        for old in (ROOT / PACKAGE_DIR).glob("*_pb2*"):
            old.unlink()
        files = generate(ROOT)
        print(f"generated {len(files)} files under {PACKAGE_DIR}")
        return 0
    if command == "check":
        with tempfile.TemporaryDirectory() as tmp:
            fresh = set(generate(Path(tmp)))
            committed = {
                p.relative_to(ROOT)
                for p in (ROOT / "subsidy").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            }
            stale = sorted(
                str(p)
                for p in fresh | committed
                if p not in fresh
                or p not in committed
                or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
            )
        if stale:
            print("generated protobuf code is stale: " + ", ".join(stale), file=sys.stderr)
            print("did you forget to run `make proto`?", file=sys.stderr)
            return 1
        print("generated protobuf code is fresh")
        return 0
    print("usage: python -m subsidyctl.proto [generate|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
