"""Package discovery for the `diffgentor` package, whose root is this folder (`package-dir` in pyproject.toml).

setuptools' declarative `packages.find` cannot add the `diffgentor.` prefix that this layout needs, so the
subpackages are found here: every folder with an `__init__.py` (a new one is packaged without editing anything).
Everything else is configured in pyproject.toml. This script sits in the package's root folder, so `build_py`
is told to leave it out of the package."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SUBPACKAGES = find_packages(".", exclude=("tests", "tests.*", "build", "build.*", "dist", "dist.*"))


class BuildPyWithoutSetupScript(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "diffgentor" and m[1] == "setup")]


setup(
    packages=["diffgentor", *(f"diffgentor.{p}" for p in SUBPACKAGES)],
    cmdclass={"build_py": BuildPyWithoutSetupScript},
)
