"""Build script for freezert's optional native extension ``freezert._C`` (CMake + pybind11).

All metadata lives in pyproject.toml; this file only drives CMake. The extension is
optional: when it cannot be built (no compiler, no CMake, pybind11 missing, CMake fails)
the package installs as pure Python, prints a warning, and ``freezert._native`` falls back
to the plain-torch references.

Environment variables:
  FREEZERT_NO_NATIVE=1     skip the native build entirely (pure-Python install)
  FREEZERT_NO_CUDA=1       build the CPU kernels only, even when nvcc is found
  FREEZERT_CUDA_ARCHS=...  CMAKE_CUDA_ARCHITECTURES (default "80-real;90": sm_80, sm_90 + PTX 90)
  FREEZERT_CMAKE_ARGS=...  extra arguments for the CMake configure step
  CUDACXX / CUDA_HOME      where to find nvcc (else PATH, else /usr/local/cuda/bin/nvcc)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nfreezert: WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _find_cmake() -> str | None:
    try:  # the `cmake` wheel from [build-system] requires
        import cmake  # type: ignore

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    return shutil.which("cmake")


def _find_ninja() -> str | None:
    try:
        import ninja  # type: ignore

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    return shutil.which("ninja")


def _find_nvcc() -> str | None:
    if _truthy("FREEZERT_NO_CUDA"):
        return None
    cands = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project; never fails the install (pure-Python fallback)."""

    _failed: set[str] = set()  # file names of extensions that did not build

    def build_extension(self, ext: Extension) -> None:
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        t0 = time.monotonic()
        try:
            cuda = self._build(dest)
        except Exception as exc:  # noqa: BLE001 - any failure means: install without _C
            self._failed = self._failed | {dest.name}
            _warn(
                f"building the native extension freezert._C failed ({exc}).\n"
                "freezert is installed as pure Python: hashing and cache codecs use the slower\n"
                "torch/numpy references (freezert._native.native_info() says why).\n"
                "Install a C++17 compiler and run `pip install -v -e .` again to see the build log."
            )
            return
        print(
            f"freezert: built {dest.name} ({'CPU + CUDA' if cuda else 'CPU only'}) "
            f"in {time.monotonic() - t0:.1f}s",
            flush=True,
        )

    # A failed optional extension must not appear in the outputs that editable/wheel builds copy.
    def get_outputs(self) -> list[str]:
        return [p for p in super().get_outputs() if Path(p).name not in self._failed]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        return {k: v for k, v in mapping.items() if Path(k).name not in self._failed}

    def copy_extensions_to_source(self) -> None:
        saved = self.extensions
        self.extensions = [e for e in saved if Path(self.get_ext_filename(e.name)).name not in self._failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = saved

    def _build(self, dest: Path) -> bool:
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 not importable (pip install pybind11)") from exc
        build_dir = Path(self.build_temp).resolve() / "freezert_cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFREEZERT_OUTPUT_DIR={dest.parent}",
            f"-DFREEZERT_VERSION={self.distribution.get_version()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        ninja = _find_ninja()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("FREEZERT_CMAKE_ARGS", ""))
        nvcc = _find_nvcc()
        if nvcc:
            archs = os.environ.get("FREEZERT_CUDA_ARCHS", "80-real;90")
            cuda_args = ["-DFREEZERT_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DFREEZERT_CUDA_ARCHS={archs}"]
            try:
                self._cmake(cmake, build_dir, args + cuda_args, ninja is not None)
                return True
            except RuntimeError as exc:
                _warn(f"the CUDA build with {nvcc} failed ({exc}); building the CPU kernels only.")
                shutil.rmtree(build_dir, ignore_errors=True)
                build_dir.mkdir(parents=True, exist_ok=True)
        self._cmake(cmake, build_dir, args + ["-DFREEZERT_WITH_CUDA=OFF"], ninja is not None)
        return False

    def _cmake(self, cmake: str, build_dir: Path, args: list[str], ninja: bool) -> None:
        dest = Path(self.get_ext_fullpath("freezert._C")).resolve()
        dest.unlink(missing_ok=True)
        self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], "configure")
        build = [cmake, "--build", str(build_dir), "--config", "Release"]
        if not ninja:
            build += ["--parallel", str(os.cpu_count() or 2)]
        self._run(build, "build")
        if not dest.exists():
            raise RuntimeError(f"CMake finished but {dest} is missing")

    @staticmethod
    def _run(cmd: list[str], step: str) -> None:
        print("freezert:", " ".join(shlex.quote(c) for c in cmd), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode != 0:
            lines = proc.stdout.strip().splitlines() or ["no output"]
            at = next((i for i, ln in enumerate(lines) if "error" in ln.lower()), len(lines) - 1)
            detail = " ".join(ln.strip() for ln in lines[at : at + 4] if ln.strip())
            raise RuntimeError(f"cmake {step} exited with {proc.returncode}: {detail[:400]}")


def _ext_modules() -> list[Extension]:
    if _truthy("FREEZERT_NO_NATIVE"):
        _warn("FREEZERT_NO_NATIVE is set: installing without the native extension freezert._C.")
        return []
    return [CMakeExtension("freezert._C")]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
