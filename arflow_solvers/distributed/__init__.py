"""Many samples across ranks with torch.distributed: seeded per sample, sharded, resumable, checked.

A run writes `manifest.json` (what the samples depend on), one file per shard, and on rank 0
`samples.pt`. A rerun into the same directory resumes only the run the manifest describes;
every shard on disk is checked before it is trusted, and one that cannot be read or holds
the wrong rows is renamed aside (`shard_000003.pt.corrupt`) and solved again. Samples the
model cannot produce (it overflows on some noise) never stop a run: each sample's
[`Status`][arflow_solvers.Status] is stored next to it, and the merge says how many failed.
"""

from ._merged import Merged
from ._run import merge_shards, sample_many
from ._spec import MANIFEST as MANIFEST
from ._spec import MERGED as MERGED
from ._spec import ResumeError, ShardSpec, sample_noise, shard_path
from ._spec import Sampler as Sampler

__all__ = ["ShardSpec", "Merged", "ResumeError", "sample_noise", "shard_path", "sample_many", "merge_shards"]
