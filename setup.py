"""Packages found, not listed: each top-level folder is one part of the ``logitwatch`` package.

``agent/`` installs as ``logitwatch.agent`` and ``service/`` as ``logitwatch.service``; every
subpackage under them is discovered, so a new folder can never be left out of the wheel.
"""

from setuptools import find_packages, setup

PARTS = {"logitwatch": "logitwatch", "logitwatch.agent": "agent", "logitwatch.service": "service"}

packages = []
for name, folder in PARTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(package_dir=PARTS, packages=packages)
