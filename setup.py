"""Maps the top-level folders core/, plugins/, sdk/ to pegboard.core, pegboard.plugins, pegboard.sdk.

pyproject's package-find cannot rename roots, so the package list is computed here.
"""

from setuptools import find_packages, setup

ROOTS = {"core": "pegboard.core", "plugins": "pegboard.plugins", "sdk": "pegboard.sdk"}

packages = []
package_dir = {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
