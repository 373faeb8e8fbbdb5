"""Regenerate the gRPC stubs of centra/protos/centra/v1/centra.proto into centra/serve/v1 (committed).

    python tools/gen_protos.py            # rewrite centra/serve/v1/centra_pb2{.py,.pyi,_grpc.py}
    python tools/gen_protos.py --out DIR  # write them into DIR instead (tests compare the two)

It also writes the Open Inference Protocol's stubs (centra/protos/inference/open_inference_grpc.proto, KServe's
file unchanged, package `inference`) into centra/serve/inference (`generate_oip`). Those register their
descriptors in a pool of their own, not protobuf's default pool: tritonclient registers the same message
names (package `inference`, from Triton's grpc_service.proto) in the default pool, and one process may
hold both (a test, a client beside a server). The wire format and method paths are unchanged.

Needs grpcio-tools (the `dev` extra). The stubs record the grpcio-tools and protobuf versions that made
them, and refuse to import under an older grpcio / protobuf runtime: keep pyproject's floors at those.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "centra" / "protos"  # shipped in the wheel (package data)
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


OIP_PROTO = "inference/open_inference_grpc.proto"
OIP_DEST = ROOT / "centra" / "serve" / "inference"
OIP_OUTPUTS = ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi", "open_inference_grpc_pb2_grpc.py")
OIP_GENERATED_IMPORT = "from inference import open_inference_grpc_pb2"
OIP_PACKAGE_IMPORT = "from centra.serve.inference import open_inference_grpc_pb2"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "POOL = _descriptor_pool.DescriptorPool()  # not Default(): see tools/gen_protos.py\n" \
           "DESCRIPTOR = POOL.AddSerializedFile("


def generate_oip(dest: Path) -> list[Path]:
    """The Open Inference Protocol stubs into dest, their descriptors in a pool of their own."""
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).resolve().parent / "_proto"
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / OIP_PROTO)])
        if code != 0:
            raise SystemExit(f"gen_protos: protoc failed on {OIP_PROTO} (exit {code})")
        written = []
        for name in OIP_OUTPUTS:
            text = (Path(tmp) / "inference" / name).read_text(encoding="utf-8")
            for old, new in ((OIP_GENERATED_IMPORT, OIP_PACKAGE_IMPORT), (DEFAULT_POOL, OWN_POOL)):
                if name == "open_inference_grpc_pb2.pyi" or (new == OWN_POOL) != name.endswith("_pb2.py"):
                    continue
                if old not in text:
                    raise SystemExit(f"gen_protos: {name} has no {old!r} to fix")
                text = text.replace(old, new)
            (dest / name).write_text(text, encoding="utf-8")
            written.append(dest / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEST, help=f"destination folder (default {DEST.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    for path in generate_oip(OIP_DEST if args.out == DEST else args.out / "inference"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
