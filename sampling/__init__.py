"""Sampling crystals from a trained model: `xtalgen sample` and the periodic pass of training.

    from xtalgen.sampling.driver import sample_to_directory     # CIFs + extxyz + JSONL, resumable
    from xtalgen.sampling.writer import merge_parts, read_samples
    from xtalgen.sampling.periodic import make_periodic_sampler  # fn(model, step) -> metrics

Modules: `plan` (batches, per-batch seeds, ranks), `conditions` (name=value -> tensors), `writer`
(output files, commit log, recovery, merge), `driver` (the loop), `periodic`, `cli`. Nothing is
imported here, so `xtalgen --help` stays fast.
"""
