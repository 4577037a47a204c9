"""Generate the Python stubs of users-service from the repository's proto/ tree.

    python generate.py                 # writes ./gen (gitignored)
    python generate.py --out /some/dir

Then put the output directory on sys.path (or PYTHONPATH) and import:

    from users.v1 import users_pb2, users_pb2_grpc
    from google.rpc import error_details_pb2

It compiles proto/users/v1/*.proto and the vendored
proto/google/rpc/error_details.proto with grpc_tools.protoc; the
google/protobuf well-known types (struct, timestamp, duration) come with
grpcio-tools, so no protoc binary is needed.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
DEFAULT_OUT = HERE / "gen"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """The files to compile, relative to proto_root (so module paths are users.v1.*)."""
    ours = sorted(p.relative_to(proto_root).as_posix() for p in (proto_root / "users" / "v1").glob("*.proto"))
    if not ours:
        raise FileNotFoundError(f"no .proto files in {proto_root / 'users' / 'v1'}")
    return [*ours, "google/rpc/error_details.proto"]


def generate(out_dir: Path | str = DEFAULT_OUT, proto_root: Path | str = PROTO_ROOT) -> Path:
    """Compile the protos into out_dir (created if missing) and return it."""
    out_dir = Path(out_dir).resolve()
    proto_root = Path(proto_root).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *proto_files(proto_root),
    ]
    from grpc_tools import protoc  # imported late: `--help` works without grpcio-tools

    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {code}: {' '.join(args)}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: %(default)s)")
    parser.add_argument("--proto-root", default=str(PROTO_ROOT), help="proto include root (default: %(default)s)")
    args = parser.parse_args(argv)
    out = generate(args.out, args.proto_root)
    print(f"stubs written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
