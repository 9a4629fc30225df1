"""Shard sets: LMDB and WebDataset writers/readers, manifests, verification, statistics, subsets.

    from xtalgen.sharding import ShardSetWriter, open_shards
    writer = ShardSetWriter("shards/perov", fmt="lmdb")
    writer.add("train", record); ...; writer.finalize(sources=[...], rejected={...}, config={...})
    shards = open_shards("shards/perov"); shards.stats["mean_density"]
    shards = open_shards("https://host/shards/perov")   # or "pipe:aws s3 cp s3://b/perov/{name} -"

Knows nothing of readers of raw inputs or of loaders (`xtalgen.datasets`): it only stores
`xtalgen.record.CrystalRecord`s.
"""

from xtalgen.sharding.codec import ShardCorruptionError
from xtalgen.sharding.manifest import manifest_hash, read_manifest
from xtalgen.sharding.reader import ShardSet, open_shards
from xtalgen.sharding.remote import ShardUnavailableError, is_remote
from xtalgen.sharding.stats import format_stats, shard_stats
from xtalgen.sharding.subset import load_subset, make_subset
from xtalgen.sharding.verify import ShardProblem, VerifyReport, verify_shards
from xtalgen.sharding.writer import FORMATS, ShardSetWriter

__all__ = [
    "FORMATS",
    "ShardCorruptionError",
    "ShardProblem",
    "ShardSet",
    "ShardSetWriter",
    "ShardUnavailableError",
    "VerifyReport",
    "format_stats",
    "is_remote",
    "load_subset",
    "make_subset",
    "manifest_hash",
    "open_shards",
    "read_manifest",
    "shard_stats",
    "verify_shards",
]
