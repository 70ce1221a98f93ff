"""Copy a wheel without the members a KV-transfer run does not load, so that it and the server
wheels fit one device call (64 MiB in all, the working tree included). Defaults drop NIXL's
expert-parallel extension (nixl_ep_*, ~28 MB) and Mooncake's command-line tools and servers
(its store, clients, servers and the libraries only they load). The wheel's RECORD loses
the dropped files' lines, so `pip install` takes the result as it takes the original (the
file name stays the same; write it into another folder).

    python scripts/slim_wheel.py /tmp/pd-wheels/nixl_cu13-1.5.1-*.whl .whl/

The whole recipe for a PD device call is in docs/benchmarks.md, "PD disaggregation".
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import zipfile

DROP = [
    # NIXL: the expert-parallel extension (one build per torch version), UCX's perf tests.
    "nixl_ep_*/*",
    "nixl_*.libs/ucx/libucx_perftest*",
    # Mooncake: only `mooncake.engine` (TransferEngine) is loaded; it needs engine.so,
    # libetcd_wrapper.so, libasio.so and yaml-cpp/jsoncpp/glog/gflags from the .libs folder.
    "mooncake/mooncake_client",
    "mooncake/mooncake_master",
    "mooncake/transfer_engine_bench",
    "mooncake/_store*.so",
    "mooncake/_ep*.so",
    "mooncake/libmooncake_pg*.so",
    "mooncake/libmooncake_ep_device.so",
    "mooncake_transfer_engine_*.libs/libetcd_wrapper-*.so",
    "mooncake_transfer_engine_*.libs/libcrypto-*",
    "mooncake_transfer_engine_*.libs/libzmq-*",
    "mooncake_transfer_engine_*.libs/libzstd-*",
    "mooncake_transfer_engine_*.libs/libpgm-*",
    "mooncake_transfer_engine_*.libs/libsodium-*",
    "mooncake_transfer_engine_*.libs/libunwind-*",
    "mooncake_transfer_engine_*.libs/liburing-*",
    "mooncake_transfer_engine_*.libs/libxxhash-*",
]


def slim(wheel: str, out: str, drop: list[str]) -> tuple[int, int]:
    """Write `wheel` without the members matching `drop` to `out` (a file, or a folder to put
    it in under its own name); returns the bytes (compressed) dropped and written."""
    if os.path.isdir(out):
        out = os.path.join(out, os.path.basename(wheel))
    dropped_bytes, dropped = 0, set()
    with zipfile.ZipFile(wheel) as src:
        items = src.infolist()
        for item in items:
            if any(fnmatch.fnmatch(item.filename, pat) for pat in drop):
                dropped.add(item.filename)
                dropped_bytes += item.compress_size
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in items:
                if item.filename in dropped:
                    continue
                data = src.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    kept = [ln for ln in lines if ln.split(",", 1)[0] not in dropped]
                    data = ("\n".join(kept) + "\n").encode()
                dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
    return dropped_bytes, os.path.getsize(out)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("wheel")
    p.add_argument("out", help="the slimmed wheel's path, or a folder to write it into")
    p.add_argument("--drop", nargs="*", default=DROP, help="fnmatch patterns of members to drop")
    args = p.parse_args()
    dropped, size = slim(args.wheel, args.out, args.drop)
    print(f"{args.out}: {size / 1e6:.1f} MB written, {dropped / 1e6:.1f} MB (compressed) dropped")


if __name__ == "__main__":
    main()
