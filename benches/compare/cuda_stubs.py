#!/usr/bin/env python3
"""Make the PyPI (CUDA) build of torch importable without its multi-GB CUDA wheels.

Concrete ML 1.9.0 pins ``torch==2.3.1``. On Linux x86_64 the PyPI wheel of that
torch is a CUDA 12 build whose shared libraries link against libcudart,
libcublas, libcudnn, libnccl, ... shipped as ``nvidia-*-cu12`` wheels (about
2.5 GB, plus ``triton``). ``run.sh`` installs torch with ``--no-deps`` and
leaves those wheels out; this script then compiles tiny stand-in libraries
(a few KB each; needs ``gcc`` and ``readelf``) so that ``import torch`` works
and ``torch.cuda.is_available()`` is False. Everything Concrete ML does here
runs on the CPU.

How: it reads the dynamic section of every library in ``torch/lib`` (and
``torch/_C*.so``), finds each ``NEEDED`` library that neither torch nor the
system provides, and writes a stub with that SONAME that defines every symbol
torch imports from it (matched by symbol version, which is the SONAME for the
CUDA libraries, or by name prefix for the unversioned ones such as ``nccl*``).
Every stub function returns 100 (cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE);
device counts are reported as 0. The stubs go to ``site-packages/nvidia/
<package>/lib``, the first directory on torch's RUNPATH, where the real wheels
would put them. This is the approach of ``models/training/make_cuda_stubs.py``
(written for torch 2.15 / CUDA 13), made independent of the CUDA version.

    python benches/compare/cuda_stubs.py     # with the venv's python
"""

from __future__ import annotations

import collections
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Unversioned imports, assigned to a missing library by name prefix
# (only symbols that no torch library defines itself are considered).
PREFIXES = [
    ("nccl", "libnccl.so"),
    ("nvtx", "libnvToolsExt.so"),
    ("curand", "libcurand.so"),
    ("cudnn", "libcudnn.so"),
    ("cuFile", "libcufile.so"),
    ("nvshmem", "libnvshmem_host.so"),
    ("cusparseLt", "libcusparseLt.so"),
    ("cu", "libcuda.so"),  # driver API (cuDevice*, cuCtx*, ...), last: shortest prefix
]


def readelf(args: list[str], path: Path) -> str:
    return subprocess.run(["readelf", *args, "-W", str(path)], check=True, capture_output=True,
                          text=True).stdout


def dynamic(path: Path):
    needed, runpath = [], []
    for line in readelf(["-d"], path).splitlines():
        m = re.search(r"\((NEEDED|RUNPATH|RPATH)\)\s+.*\[(.*)\]", line)
        if not m:
            continue
        if m.group(1) == "NEEDED":
            needed.append(m.group(2))
        else:
            runpath.extend(m.group(2).split(":"))
    return needed, runpath


def symbols(path: Path):
    """(undefined [(name, version, type)], defined {name})"""
    und, defined = [], set()
    for line in readelf(["--dyn-syms"], path).splitlines():
        cols = line.split()
        if len(cols) < 8 or not cols[0].rstrip(":").isdigit():
            continue
        typ, ndx, sym = cols[3], cols[6], cols[7]
        name, _, ver = sym.partition("@")
        ver = ver.lstrip("@").split(" ")[0] or None
        if ndx == "UND":
            if name:
                und.append((name, ver, typ))
        else:
            defined.add(name)
    return und, defined


def system_has(soname: str, cache: str) -> bool:
    return f"{soname} " in cache or f"/{soname}\n" in cache


def main() -> None:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        sys.exit("torch is not installed")
    torch_dir = Path(spec.origin).parent
    libs = sorted(list(torch_dir.glob("lib/*.so*")) + list(torch_dir.glob("_C*.so")))
    own = {p.name for p in libs}
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        ldcache = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        ldcache = ""

    needed_all: set[str] = set()
    runpaths: list[str] = []
    lib_runpaths: list[str] = []  # RUNPATH of the libraries in torch/lib, where the stubs go
    und_all = []
    defined_all: set[str] = set()
    for so in libs:
        needed, runpath = dynamic(so)
        needed_all.update(needed)
        for r in runpath:
            d = str(Path(r.replace("$ORIGIN", str(so.parent))).resolve())
            if d not in runpaths:
                runpaths.append(d)
            if so.parent.name == "lib" and d not in lib_runpaths:
                lib_runpaths.append(d)
        und, defined = symbols(so)
        und_all.extend(und)
        defined_all |= defined

    def resolvable(soname: str) -> bool:
        if soname in own or system_has(soname, ldcache):
            return True
        return any((Path(d) / soname).exists() for d in runpaths)

    missing = sorted(n for n in needed_all if not resolvable(n))
    if not missing:
        print("cuda_stubs: every library torch needs is present; nothing to do", file=sys.stderr)
        return
    nvidia_dirs = [d for d in lib_runpaths if "/nvidia/" in d]
    if not nvidia_dirs:
        sys.exit(f"cuda_stubs: torch needs {missing} but has no nvidia/*/lib directory on its RUNPATH")
    out_dir = Path(nvidia_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)

    by_lib: dict[str, dict[str, tuple]] = collections.defaultdict(dict)
    for name, ver, typ in und_all:
        if ver in missing:
            by_lib[ver][name] = (ver, typ)
        elif ver is None and name not in defined_all:
            for prefix, stem in PREFIXES:
                if name.startswith(prefix):
                    target = next((m for m in missing if m.startswith(stem + ".")), None)
                    if target:
                        by_lib[target][name] = (None, typ)
                    break

    with tempfile.TemporaryDirectory() as tmp:
        for soname in missing:
            syms = sorted(by_lib.get(soname, {}).items())
            c = [f"/* CPU-only stand-in for {soname}: every entry point reports 'no device' */",
                 'static const char msg[] = "CUDA stub library (no GPU)";']
            versions = collections.defaultdict(list)
            for name, (ver, typ) in syms:
                if ver:
                    versions[ver].append(name)
                if typ == "OBJECT":
                    c.append(f"char {name}[256];")
                elif re.search(r"(ErrorString|ErrorName|GetString)$", name):
                    c.append(f"const char *{name}(void){{return msg;}}")
                elif name in ("cudaGetDeviceCount", "cuDeviceGetCount"):
                    c.append(f"int {name}(int *n){{if(n)*n=0;return 100;}}")
                else:
                    c.append(f"int {name}(void){{return 100;}}")
            vscript = [f"{ver} {{ global: {' '.join(n + ';' for n in names)} }};"
                       for ver, names in versions.items()]
            vscript.append("STUB_DEFAULT { global: *; };")
            src = Path(tmp) / f"{soname}.c"
            vmap = Path(tmp) / f"{soname}.map"
            src.write_text("\n".join(c) + "\n")
            vmap.write_text("\n".join(vscript) + "\n")
            subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-w", "-fno-builtin", "-o", str(out_dir / soname),
                            str(src), f"-Wl,-soname,{soname}", f"-Wl,--version-script={vmap}"], check=True)
            print(f"cuda_stubs: {out_dir / soname}: {len(syms)} symbols", file=sys.stderr)


if __name__ == "__main__":
    main()
