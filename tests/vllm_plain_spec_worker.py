"""A CPU worker that reports plain full-attention KV specs even when a KV policy is configured.

Simulates a worker where cam-vllm's attention backend is not active (another backend chosen, a
platform without one): the engine core must then refuse to start instead of serving the policy
with full attention. Used as ``--worker-cls vllm_plain_spec_worker.PlainSpecWorker`` with this
directory on PYTHONPATH.
"""

from __future__ import annotations

from vllm.v1.kv_cache_interface import FullAttentionSpec, replace_as
from vllm.v1.worker.cpu_worker import CPUWorker

from cam_vllm.vllm_plugin.kv_manager import PolicyAttentionSpec


class PlainSpecWorker(CPUWorker):
    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        return {  # drop every field the policy spec adds
            name: replace_as(spec, FullAttentionSpec, drop=tuple(spec.policy_fields))
            if isinstance(spec, PolicyAttentionSpec)
            else spec
            for name, spec in specs.items()
        }
