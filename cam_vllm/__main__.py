"""``python -m cam_vllm`` is the ``cam-vllm`` command."""

import sys

from cam_vllm.cli import main

sys.exit(main())
