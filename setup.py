# cffi_modules needs setup.py: `pip install .` compiles cdefs/ into vmm._kvm.
from setuptools import setup

setup(cffi_modules=["vmm/_build.py:ffibuilder"])
