"""Regenerate the gRPC stubs of protos/centra/v1/centra.proto into centra/serve/v1 (committed).

    python tools/gen_protos.py            # rewrite centra/serve/v1/centra_pb2{.py,.pyi,_grpc.py}
    python tools/gen_protos.py --out DIR  # write them into DIR instead (tests compare the two)

Needs grpcio-tools (the `dev` extra). The stubs record the grpcio-tools and protobuf versions that made
them, and refuse to import under an older grpcio / protobuf runtime: keep pyproject's floors at those.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "centra/v1/centra.proto"
DEST = ROOT / "centra" / "serve" / "v1"
OUTPUTS = ("centra_pb2.py", "centra_pb2.pyi", "centra_pb2_grpc.py")
# protoc names the module after the proto's folder (centra/v1); it lives in the package at centra/serve/v1.
GENERATED_IMPORT = "from centra.v1 import centra_pb2"
PACKAGE_IMPORT = "from centra.serve.v1 import centra_pb2"


def generate(dest: Path) -> list[Path]:
    """Run protoc on the proto and write the three stub files into dest; returns their paths."""
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)])
        if code != 0:
            raise SystemExit(f"gen_protos: protoc failed on {PROTO} (exit {code})")
        written = []
        for name in OUTPUTS:
            text = (Path(tmp) / "centra" / "v1" / name).read_text(encoding="utf-8")
            if name.endswith("_grpc.py"):
                if GENERATED_IMPORT not in text:
                    raise SystemExit(f"gen_protos: {name} has no line {GENERATED_IMPORT!r} to fix")
                text = text.replace(GENERATED_IMPORT, PACKAGE_IMPORT)
            (dest / name).write_text(text, encoding="utf-8")
            written.append(dest / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEST, help=f"destination folder (default {DEST.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
