"""The one build step pyproject.toml cannot declare: compiling the sandbox's launcher.

`reconciler/executor/launch.c` becomes `spos-launch-<digest>` beside it: in the wheel for a
normal install, in the checkout for an editable one (`pip install -e .`). Without a C compiler
the install still succeeds, with a warning, and the sandbox runs the Python launcher instead
(`spos executor` says which one it uses). Everything else is configured in pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.build import build

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = Path("reconciler", "executor")


def _builder():
    spec = importlib.util.spec_from_file_location("spos_launcher_build",
                                                  HERE / PACKAGE_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildLauncher(Command):
    description = "compile the sandbox launcher (reconciler/executor/launch.c)"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set by setuptools for `pip install -e`
        self.outputs = []

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self):
        into = HERE / PACKAGE_DIR if self.editable_mode else Path(self.build_lib) / PACKAGE_DIR
        into.mkdir(parents=True, exist_ok=True)
        built, why_not = _builder().build(into)
        if built is None:
            self.warn(f"the sandbox launcher was not compiled ({why_not}); spos will start "
                      "sandboxed actions through Python, about 15 ms slower per run")
        elif not self.editable_mode:
            self.outputs = [str(built)]

    def get_outputs(self):
        return self.outputs

    def get_output_mapping(self):
        return {}

    def get_source_files(self):
        return [str(PACKAGE_DIR / "launch.c")]


class BinaryDistribution(Distribution):
    """The wheel holds an executable for one platform: tag it so, not as pure Python."""

    def has_ext_modules(self):
        return True


build.sub_commands = [*build.sub_commands, ("build_launcher", None)]

setup(cmdclass={"build_launcher": BuildLauncher}, distclass=BinaryDistribution)
