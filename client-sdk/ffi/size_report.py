#!/usr/bin/env python3
"""What the SDK's shared library is made of.

    python3 client-sdk/ffi/size_report.py [DIR]

DIR holds `libstarling_sdk_ffi.so` and `libstarling_sdk_ffi.a` from one build (default:
`$CARGO_TARGET_DIR/release`, else `target/release`). Prints the shared library's size, stripped
(`strip --strip-unneeded`: what an app ships) with its largest sections, and what each crate or C
library contributes to it.

The attribution is exact, not a guess from symbol names: the static library is linked again the
way the cdylib was (the same exported symbols, `--gc-sections`, a version script hiding the
rest) with a linker map, and every input section the linker kept is counted for the archive
member it came from (Rust code is in `<crate>.<hash>.rcgu.o` members, SQLCipher in
`*-sqlcipher.o`, OpenSSL in `libcrypto-*`/`libssl-*`). Generic code is counted for the crate
that instantiated it (usually the caller). Debug sections are left out; the relinked library's
stripped size is printed to show that it matches.
"""

import collections
import os
import re
import subprocess
import sys
import tempfile


def owner(member: str) -> str:
    if member.startswith("libcrypto-") or member.startswith("libssl-") or member.startswith("lib") and "-lib-" in member:
        return "openssl (vendored for SQLCipher)"
    if "sqlcipher" in member or "sqlite" in member:
        return "sqlcipher (SQLite)"
    if member.endswith(".rcgu.o"):
        return member.split(".")[0].split("-")[0]
    return "other C/asm: " + re.sub(r"^[0-9a-f]{16}-", "", member)


FAMILIES = [
    ("storage: SQLCipher + vendored OpenSSL + rusqlite", r"^(openssl|sqlcipher|rusqlite|libsqlite3_sys|hashlink|fallible)"),
    ("training: burn (flex, autodiff, optim) and its kernels", r"^(burn|gemm|cubecl|pulp|dyn_stack|half|bytemuck|num_traits|matrixmultiply|seq_macro|macerator|rayon|crossbeam)"),
    ("network: quinn, rustls, ring, tokio", r"^(quinn|rustls|ring|webpki|tokio|mio|socket2|other C/asm: (p256|curve25519|ecp|aes|chacha|sha|ghash|x86|poly))"),
    ("local DP: opendp and its big integers", r"^(opendp|dashu|rug|statrs)"),
    ("Starling (proto, models, sdk, ffi)", r"^starling"),
    ("UniFFI runtime", r"^uniffi"),
    ("Rust std/core/alloc", r"^(std|core|alloc|hashbrown|compiler_builtins|gimli|addr2line|object|miniz|rustc_demangle)$"),
]


def family(who: str) -> str:
    for name, pattern in FAMILIES:
        if re.match(pattern, who):
            return name
    return "other"


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release")
    so, a = os.path.join(d, "libstarling_sdk_ffi.so"), os.path.join(d, "libstarling_sdk_ffi.a")
    with tempfile.TemporaryDirectory() as tmp:
        stripped = os.path.join(tmp, "stripped.so")
        subprocess.run(["strip", "--strip-unneeded", "-o", stripped, so], check=True)
        print(f"{so}: {os.path.getsize(so) / 1e6:.1f} MB, stripped {os.path.getsize(stripped) / 1e6:.2f} MB")
        sections = subprocess.run(["size", "-A", stripped], check=True, capture_output=True, text=True).stdout
        rows = sorted(
            ((int(r[1]), r[0]) for r in (l.split() for l in sections.splitlines() if l.startswith("."))),
            reverse=True,
        )[:5]
        print("largest sections: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for s, n in rows))

        exports = subprocess.run(["nm", "-D", "--defined-only", so], check=True, capture_output=True, text=True)
        names = [l.split()[-1] for l in exports.stdout.splitlines() if l.split() and not l.split()[-1].startswith("_")]
        script = os.path.join(tmp, "exports.map")
        with open(script, "w") as f:
            f.write("{ global:\n" + "".join(f"  {n};\n" for n in names) + "local: *; };\n")
        relinked, mapfile = os.path.join(tmp, "relinked.so"), os.path.join(tmp, "link.map")
        subprocess.run(
            ["gcc", "-shared", "-o", relinked, "-Wl,--gc-sections", f"-Wl,--version-script={script}", f"-Wl,-Map={mapfile}"]
            + [f"-Wl,--undefined={n}" for n in names]
            + [a, "-lpthread", "-ldl", "-lm"],
            check=True,
        )
        subprocess.run(["strip", "--strip-unneeded", relinked], check=True)
        print(f"relinked from the static library for the attribution: {os.path.getsize(relinked) / 1e6:.2f} MB stripped")
        total = collections.Counter()
        in_map = False
        pending = None
        entry = re.compile(r"^\s*(\S+)?\s+0x[0-9a-f]+\s+0x([0-9a-f]+)\s+\S*\.a\((.+)\)\s*$")
        for line in open(mapfile, errors="replace"):
            if line.startswith("Linker script and memory map"):
                in_map = True
                continue
            if not in_map:
                continue
            m = entry.match(line)
            if m:
                section = m.group(1) or pending or ""
                pending = None
                if not section.startswith(".debug") and not section.startswith(".comment"):
                    total[owner(m.group(3))] += int(m.group(2), 16)
            else:
                s = line.strip()
                pending = s if s.startswith(".") and " " not in s else None
    s = sum(total.values())
    families = collections.Counter()
    for who, size in total.items():
        families[family(who)] += size
    print(f"kept input sections: {s / 1e6:.2f} MB; by part:")
    for name, size in families.most_common():
        print(f"  {size / 1e6:6.2f} MB {100 * size / s:5.1f}%  {name}")
    print(f"kept input sections: {s / 1e6:.2f} MB; by origin (top 22):")
    for who, size in total.most_common(22):
        print(f"  {size / 1e6:6.2f} MB {100 * size / s:5.1f}%  {who}")


if __name__ == "__main__":
    main()
