#!/usr/bin/env bash
# Regenerates tier2_pb2.py and tier2_pb2_grpc.py from tier2.proto.
# Uses grpcio-tools 1.62.x on purpose: its output carries no runtime version checks, so the committed
# code imports on any protobuf >= 4.25 and grpcio >= 1.60 (the GPU image's included); newer
# grpcio-tools emit code that refuses older runtimes. tests/test_protos.py checks the result is current.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="${GRPC_TOOLS_DIR:-/tmp/grpcio_tools_1_62}"
if [ ! -d "$TOOLS/grpc_tools" ]; then
  python3 -m pip install -q --no-deps --target "$TOOLS" grpcio-tools==1.62.3
fi
PYTHONPATH="$TOOLS" python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
  glinthawk_jax/protos/tier2.proto
