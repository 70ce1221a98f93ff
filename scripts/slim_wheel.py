"""Copy a wheel without the members a KV-transfer run does not load, so it fits a device call
(64 MiB in all). Defaults drop NIXL's expert-parallel extension (nixl_ep_*, ~28 MB) and
Mooncake's command-line tools (mooncake_client, mooncake_master, transfer_engine_bench).
Extract the result on the device with `python3 -m zipfile -e OUT.whl DIR` (a wheel is a zip).

    python scripts/slim_wheel.py .whl/nixl_cu13-*.whl .whl-pd/nixl_cu13-slim.whl
"""

from __future__ import annotations

import argparse
import fnmatch
import zipfile

DROP = [
    "nixl_ep_*/*",
    "mooncake/mooncake_client",
    "mooncake/mooncake_master",
    "mooncake/transfer_engine_bench",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("wheel")
    p.add_argument("out")
    p.add_argument("--drop", nargs="*", default=DROP, help="fnmatch patterns of members to drop")
    args = p.parse_args()
    kept = dropped = 0
    with zipfile.ZipFile(args.wheel) as src, zipfile.ZipFile(args.out, "w") as dst:
        for item in src.infolist():
            if any(fnmatch.fnmatch(item.filename, pat) for pat in args.drop):
                dropped += item.compress_size
                continue
            dst.writestr(item, src.read(item), compress_type=zipfile.ZIP_DEFLATED)
            kept += 1
    print(f"{args.out}: {kept} members kept, {dropped / 1e6:.1f} MB (compressed) dropped")


if __name__ == "__main__":
    main()
