"""The CPU statistics kernel, built at install time (the metadata is in pyproject.toml).

``torchdiag/_stats/_rows.c`` is plain C (no Python.h, no ``PyInit``): it is built as an extension only to be
compiled, named and placed like one, next to ``torchdiag/_stats/_cpurow.py``, which loads it with ``ctypes``.
It is optional: where it does not build (no C compiler, MSVC), torchdiag installs without it and uses the ATen
reductions.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError

# The order of the kernel's additions is fixed by its source: no contraction into FMA, no reassociation.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]


class BuildRows(build_ext):
    """Where the compiler rejects the kernel's AVX2/baseline clones (``target_clones``: musl, old compilers), one
    more try for the baseline target alone (``TD_ONE_TARGET``); the optional extension is skipped if that fails
    too."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except CCompilerError:  # CompileError, LinkError
            if ("TD_ONE_TARGET", None) in ext.define_macros:
                raise
            self.announce(f"building {ext.name} again with TD_ONE_TARGET (no function multiversioning)", 2)
            ext.define_macros.append(("TD_ONE_TARGET", None))
            super().build_extension(ext)


setup(
    ext_modules=[
        # py_limited_api: the library uses nothing of Python, so one wheel (cp39-abi3, ``_rows.abi3.so``) serves
        # every Python version of a platform
        Extension("torchdiag._stats._rows", sources=["torchdiag/_stats/_rows.c"], extra_compile_args=FLAGS,
                  optional=True, py_limited_api=True),
    ],
    cmdclass={"build_ext": BuildRows},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
