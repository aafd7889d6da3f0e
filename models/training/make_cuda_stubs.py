#!/usr/bin/env python3
"""Make a CUDA build of torch importable on a CPU-only machine without the CUDA wheels.

The PyPI ``torch`` wheel for Linux x86_64 is a CUDA build: its shared libraries
link against libcudart, libcublas, libcudnn, libnccl, ... (several GB of
``nvidia-*`` / ``cuda-toolkit`` wheels). If torch was installed with
``pip install --no-deps torch`` (and a CPU-only wheel cannot be downloaded),
``import torch`` fails with "libcudart.so.13: cannot open shared object file".

This script compiles tiny stand-in libraries (a few KB each, needs ``gcc``) into
``site-packages/nvidia/cu13/lib`` (a directory on torch's RPATH). Each one has
the right SONAME and symbol versions, and defines every symbol torch imports
from it as a function that returns 100 (cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE),
so ``torch.cuda.is_available()`` is False and everything CPU-side works.

Only needed for train.py in such an environment; it is not used otherwise:

    python models/training/make_cuda_stubs.py
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import importlib.util

SONAMES = ["libcudart.so.13", "libcupti.so.13", "libnvrtc.so.13", "libcublas.so.13", "libcublasLt.so.13",
           "libcudnn.so.9", "libcufft.so.12", "libcusolver.so.12", "libcusparse.so.12", "libcufile.so.0",
           "libcusparseLt.so.0", "libnccl.so.2", "libnvshmem_host.so.3"]
# Unversioned imports, assigned by name prefix.
PREFIXES = [("nccl", "libnccl.so.2"), ("cusparseLt", "libcusparseLt.so.0"), ("cuFile", "libcufile.so.0"),
            ("nvshmem", "libnvshmem_host.so.3")]
# Symbol versions whose name is not the SONAME.
VERSIONS = {"NVSHMEM": "libnvshmem_host.so.3"}


def main() -> None:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        sys.exit("torch is not installed")
    torch_dir = Path(spec.origin).parent
    out_dir = torch_dir.parent / "nvidia" / "cu13" / "lib"
    out_dir.mkdir(parents=True, exist_ok=True)

    libs: dict[str, set] = collections.defaultdict(set)
    for so in sorted(list(torch_dir.glob("lib/*.so*")) + list(torch_dir.glob("_C*.so"))):
        text = subprocess.run(["readelf", "--dyn-syms", "-W", str(so)], check=True,
                              capture_output=True, text=True).stdout
        for line in text.splitlines():
            cols = line.split()
            if len(cols) < 8 or cols[6] != "UND":
                continue
            sym = cols[7]
            if "@" in sym:
                name, ver = sym.split("@", 1)
                ver = ver.split(" ")[0]
                target = ver if ver in SONAMES else VERSIONS.get(ver)
                if target:
                    libs[target].add((name, ver))
            else:
                for prefix, target in PREFIXES:
                    if sym.startswith(prefix):
                        libs[target].add((sym, None))
                        break

    with tempfile.TemporaryDirectory() as tmp:
        for soname in SONAMES:
            syms = sorted(libs.get(soname, set()), key=lambda s: (s[0], s[1] or ""))
            c = [f"/* CPU-only stand-in for {soname}: every entry point reports 'no device' */",
                 'static const char msg[] = "CUDA stub library (no GPU)";']
            versions = collections.defaultdict(list)
            for name, ver in syms:
                if ver:
                    versions[ver].append(name)
                if re.search(r"(ErrorString|ErrorName|GetString)$", name):
                    c.append(f"const char *{name}(void){{return msg;}}")
                elif name in ("cudaGetDeviceCount", "cuDeviceGetCount"):
                    c.append(f"int {name}(int *n){{if(n)*n=0;return 100;}}")
                else:
                    c.append(f"int {name}(void){{return 100;}}")
            vscript = [f"{ver} {{ global: {' '.join(n + ';' for n in names)} }};" for ver, names in versions.items()]
            vscript.append("STUB_DEFAULT { global: *; };")
            src = Path(tmp) / f"{soname}.c"
            vmap = Path(tmp) / f"{soname}.map"
            src.write_text("\n".join(c) + "\n")
            vmap.write_text("\n".join(vscript) + "\n")
            subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-w", "-fno-builtin", "-o", str(out_dir / soname),
                            str(src), f"-Wl,-soname,{soname}", f"-Wl,--version-script={vmap}"], check=True)
            print(f"{out_dir / soname}: {len(syms)} symbols")


if __name__ == "__main__":
    main()
