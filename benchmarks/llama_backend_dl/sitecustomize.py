"""Benchmark-only: makes a llama-cpp-python built with ``GGML_BACKEND_DL`` serve.

Such a build ships its CPU code as one library per CPU variant (``libggml-cpu-haswell.so``, ...) and has no
CPU backend until one is loaded; llama-cpp-python 0.3.36 never loads one ("no backends are loaded",
abetlen/llama-cpp-python#2069). ``bench_llama_build.py`` puts this folder first on the server's PYTHONPATH
for such a build, so Python imports this file at start-up: it loads the best-scoring variant from where the
wheel put them (its ``bin/``), as llama.cpp's own programs do (``ggml_backend_load_all_from_path``), and writes
which one to the server's log.
"""

import ctypes
import pathlib
import sys

try:
    import llama_cpp

    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    # The wheel puts the variants in its data's bin/: the environment's bin/, or beside the package when
    # installed with --target.
    places = [lib, lib.parent.parent / "bin", pathlib.Path(sys.prefix) / "bin"]
    variants = next((place for place in places if any(place.glob("libggml-cpu-*.so"))), lib)
    # Through libllama's own handle: it finds the libggml that llama.cpp uses (a second dlopen of libggml.so
    # by another name gives a second copy, whose registry llama.cpp never reads).
    load_all = llama_cpp.llama_cpp._lib.ggml_backend_load_all_from_path
    load_all.argtypes, load_all.restype = [ctypes.c_char_p], None
    load_all(str(variants).encode())
    maps = pathlib.Path("/proc/self/maps").read_text()
    loaded = sorted(
        {pathlib.Path(line.split()[-1]).name for line in maps.splitlines() if "libggml-cpu" in line}
    )
    print(f"llama_backend_dl: loaded {', '.join(loaded) or 'no CPU variant'}", file=sys.stderr, flush=True)
except Exception as error:  # a benchmark helper: say why, let the server fail as it would
    print(f"llama_backend_dl: {error!r}", file=sys.stderr, flush=True)
